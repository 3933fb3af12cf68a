"""Engine builders and runners (shipped as rali_edge.engines).

- export.py    the engine function as a torch module (mixed-precision policy) and its ONNX export
- aoti.py      AOTInductor packages (.pt2): compile and run, CPU or CUDA
- tensorrt.py  TensorRT 10/11 builder, the torch runner and the torch-free TensorRTScorer
- naming.py    engine file names, JSON sidecars and the compatibility check (no torch import)
- runners.py   open_engine(): sidecar check, then the right EncoderBackend
- fidelity.py  the check that an engine scores like fp32 PyTorch

`rali-edge build` / `check-engine` (rali_edge/cli/build.py) drive them.
"""
