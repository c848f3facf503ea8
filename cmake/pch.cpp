// Translation unit that owns the precompiled LibTorch header (cmake/MoeforgeTorch.cmake).
