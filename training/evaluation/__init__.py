"""Defense evaluation of a model-store version (docs/EVALUATION.md).

- `core`: `evaluate()`, the thin driver: verdicts by ONNX Runtime + app.verdict, gradients by PyTorch.
- `config`: the budgets (EvalConfig); `loading`: the version and the white-box model.
- `plan`: which attacks run with which settings (the attack objects); `settings`: what ran,
  serialized into the report.
- `runner`: the target, the cached attack runner and its restarts; `cache`: the attack cache.
- `attacks`: the evaluation's attacks beyond training.attacks (ART APGD/Square wrappers, the
  adaptive attack on the whole geodesic pipeline, transfer from substitutes); `rule_attacks`:
  the attacks aimed at the verdict.
- `scoring`: verdict-based rates and the worst case; `detectors`: the three rejection scores
  and the adaptive attacks on them; `sanity`: the masking checks; `foreign`: inputs that are
  not clothing (out-of-distribution table, distal attack).
- `report`: the report and its files; `schema`: report.json; `figures`, `markdown`: the PNG
  figures and report.md; `compare`: reports side by side.
- `figure2`: the paper's Figure 2 on real data (2-D features).
- `cli`: `python -m training evaluate` and `python -m training figure2`.
"""
