"""The runtime layer every op uses: arrays in/out (DLPack), streams, NVRTC compile + cache, launch, checks."""
