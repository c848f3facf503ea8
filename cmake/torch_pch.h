// The precompiled header shared by every target that includes LibTorch (see
// cmake/MoeforgeTorch.cmake): parsing torch/torch.h dominates compile time on small machines.
#pragma once
#include <torch/torch.h>
