# Sourced by the training benchmarks (bench_ep, bench_overlap, bench_pipeline, bench_tp, bench_train):
# the checkout as the working directory, the venv's Python as $py, a temporary $work (removed on
# exit) holding the quickstart corpus, Open MPI's settings for root in a container, and bench_yaml.
root=$(cd "$(dirname "${BASH_SOURCE[1]}")/../.." && pwd)
cd "$root"
py=.venv/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
bash launch/corpus.sh "$work/corpus" >/dev/null

# $work/bench.yaml: the benchmark model (tests/bench/bench_model.yaml) trained ITERS iterations on the
# corpus with THREADS threads per rank, plus SECTIONS (more top-level YAML, e.g. "parallel: {...}";
# not training, data or hardware, which a later section would replace; chain a config with `base:`
# for those).
bench_yaml() {  # ITERS THREADS [SECTIONS]
  printf 'base: %s\ntraining:\n  train_iters: %s\ndata:\n  data_path: [%s]\nhardware:\n  num_threads: %s\n%s\n' \
    "$root/tests/bench/bench_model.yaml" "$1" "$work/corpus_text_document" "$2" "${3:-}" > "$work/bench.yaml"
}
