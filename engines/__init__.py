"""Engines: the encoder (and head) compiled for one device, and everything around them (shipped as rali_edge.engines).

- backends.py  the table of backends and the interface each implements; open_engine()
- tensorrt.py  TensorRT 10/11: builder, the torch runner and the torch-free TensorRTScorer
- aoti.py      AOTInductor packages (.pt2): compile and run, CPU or CUDA
- onnx.py      ONNX files run by ONNX Runtime on the CPU
- export.py    the engine function as a torch module (mixed-precision policy) and its ONNX export
- naming.py    engine file names, JSON sidecars and the compatibility check (no torch import)
- fidelity.py  the check that an engine scores like fp32 PyTorch
- cache.py     backend="auto": the choice per machine and the engine cache it builds into
- builder.py   build() and check(): what `rali-edge build` and `check-engine` run

Adding a backend: one module with a `BACKEND` (a backends.Backend) and one line in backends.TABLE.
"""
