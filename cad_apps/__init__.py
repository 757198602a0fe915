"""Applications built on cad_spconv and adapters: Cityscapes evaluation, mask training, the
keypoint study, benchmarks, the demo and the ``cad-spconv`` command line.

Nothing in ``cad_spconv`` or ``adapters`` imports this package (the layers run one way:
masks -> plan -> rulebooks -> engines -> ops/modules -> adapters -> applications). Modules
here keep heavy imports (torch, torchvision, spconv) inside functions where the command line
reads them, so ``cad-spconv --help`` stays fast.
"""
