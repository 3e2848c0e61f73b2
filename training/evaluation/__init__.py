"""Defense evaluation of a model-store version (docs/EVALUATION.md).

- `schema`: the pydantic schema of report.json.
- `attacks`: the evaluation's attacks beyond training.attacks (ART APGD/Square wrappers,
  the adaptive attack on the whole geodesic pipeline, transfer from substitutes).
- `core`: `evaluate()`: verdicts by ONNX Runtime + app.verdict, gradients by PyTorch.
- `figures`, `markdown`: report.md and the PNG figures.
- `figure2`: the paper's Figure 2 on real data (2-D features).
- `cli`: `python -m training evaluate` and `python -m training figure2`.
"""
