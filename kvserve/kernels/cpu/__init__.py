"""CPU kernels compiled from C++ on first use (``gemv``: int4/int8 weight-only GEMV for decode).

Unlike the Triton modules beside this package, nothing here imports Triton, and nothing is
compiled on import: ``gemv.load_gemv()`` builds and loads the ops when a model is quantized."""
