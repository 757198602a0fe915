"""Scripts for the paper's procedures on a Cityscapes root (Hesse et al., CVPRW 2023, Sec. 4).

Run from the repository root, e.g. ``python -m experiments.tradeoff --data-root R --out OUT``:

- :mod:`experiments.tradeoff`: mIoU over multiply-adds for edge thresholds and learned-mask
  budgets against nothing kept (stride 16) and everything kept (stride 8) (paper Fig. 4);
- :mod:`experiments.oracle`: the oracle mask against both baselines (Sec. 4.1, Tab. 1);
- :mod:`experiments.inadequate_masks`: edge masks against the same budget at random places,
  inverted edge masks and random masks (the "inadequate masks" ablation, Sec. 4.3 / Fig. 6);
- :mod:`experiments.overlays`: mask overlays and level maps on a few images (Fig. 3);
- :mod:`experiments.synthetic_model`: a non-trivial checkpoint for the synthetic data
  (``cad_apps.data.make_synthetic_cityscapes``), to try the scripts without Cityscapes.

Each writes ``<out>/<name>.json`` and ``<out>/<name>.png``; per-setting evaluations are kept under
``<out>/runs/`` and resumed when a script is run again (``overlays`` evaluates nothing: it runs
each mask once on a few images).
"""
