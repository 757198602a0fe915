"""The keypoint description study of the paper (Hesse, Schaub-Meyer, Roth, CVPRW 2023, Sec. 4.3,
Fig. 6): SIFT keypoints described by D2-Net (Dusmanu et al., CVPR 2019) with dense or
content-adaptive max pooling, matched on HPatches and scored by mean matching accuracy.

Modules (each one job; heavy imports inside them, so ``cad-spconv --help`` stays fast):

- :mod:`.hpatches`: the HPatches reader and a synthetic HPatches-format writer;
- :mod:`.preprocess`: resizing / cropping and caffe preprocessing of an image;
- :mod:`.sift`: the 512 strongest de-duplicated SIFT keypoints;
- :mod:`.network`: D2-Net's VGG16 conv4_3 features, the ``d2_tf.pth`` key mapping, dense
  baselines at output stride 1 / 2 / 4 / 8 and the adaptive networks F -> 8;
- :mod:`.levels`: per-level keypoint masks and budget-matched random / inverted level maps;
- :mod:`.extract`: ``cad-spconv keypoints extract`` (one ``.npz`` per image + ``summary.json``);
- :mod:`.evaluate`: ``cad-spconv keypoints evaluate`` (mutual nearest neighbours, MMA@1..15,
  the Fig. 6 plot);
- :mod:`.cli`: the two sub-commands.

See ``docs/keypoints.md``.
"""
