# Sourced by the mpirun benchmarks (bench_ep.sh, bench_overlap.sh): the checkout as the working
# directory, the venv's Python as $py, a temporary $work (removed on exit) holding the quickstart
# corpus, and Open MPI's settings for root in a container.
root=$(cd "$(dirname "${BASH_SOURCE[1]}")/../.." && pwd)
cd "$root"
py=.venv/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
bash launch/corpus.sh "$work/corpus" >/dev/null
