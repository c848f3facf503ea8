// defines: nothing; Note [shape suffixes], the one legend every file's "Shapes:" line cites.
//
// Note [shape suffixes]
// A tensor's name ends in its dimensions, one letter each, outermost first: x_BSD is
// [batch, sequence, hidden], probs_TE is [tokens, experts]. Each letter means one thing everywhere:
//
//   B   samples of a micro-batch
//   S   sequence positions of a sample
//   s   this TP rank's chunk of the sequence under sequence parallelism (S / TP)
//   T   tokens, B x S flattened (or B x s)
//   D   hidden size
//   H   query heads; G key/value heads; Dh head dimension (the one two-letter symbol)
//   V   vocabulary
//   C   a chunk of tokens (the LM head's chunked loss)
//   E   routed experts of a MoE layer
//   e   this EP rank's experts (E / EP)
//   K   top-k: the experts each token is routed to
//   A   routed slots: one per (token, chosen expert), T x K flattened in token-major order
//   N   rows of a grouped GEMM: the slots this rank's experts process, grouped by expert
//   F   an FFN's width (an expert's moe_ffn_hidden_size, the shared expert's width)
//   I   a dense FFN's width (intermediate_size: a dense model's, as upcycling reads it)
//   M   a linear weight's out-features, J its in-features, where they are not D or F
//       (the kernels' GEMMs: y_NM = x_NJ w_MJ^T; J is the reduction index)
//   L   MoE layers of the model
//   R   ranks of a process group (EP peers, DP replicas)
//
// A digit scales the letter after it: gate_up_E2FD is [experts, 2 x F, hidden].
#pragma once
