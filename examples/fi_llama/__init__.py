"""A Llama-family model served with fi_cupy, CuPy and numpy alone (no PyTorch): the pieces behind
examples/llama_decode.py. config, checkpoint, pages, scheduler and batch run on the CPU; model and
engine need a GPU, cuBLAS and ml_dtypes."""
