"""Random inputs for the tests: multi-level masks and multi-resolution tensors."""
import os

import numpy as np
import torch

from cad_spconv import CADTensor, LevelPlan

from . import dense_reference as ref

CUDA = torch.cuda.is_available()
#: the repository root (experiments run from there: ``python -m experiments.X``)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: the three Cityscapes val frames the team keeps next to the repository (tests that read
#: them skip, naming this path, where it is absent)
FRAMES = os.path.join(os.path.dirname(REPO), "shared", "data", "cityscapes_frames")


def random_masks(rng, batch, grid, num_levels, kind):
    """(spec for the library, per-level masks in numpy for the reference).

    kind: 'keep' (one keep mask, a different density per image), 'levels' (one mask per level),
    'map' (an integer level map), 'all' (everything kept), 'none' (nothing kept).
    """
    H, W = grid
    if kind in ("all", "none"):
        keep = np.full((batch, H, W), kind == "all")
        return torch.from_numpy(keep), [keep]
    if kind not in ("keep", "levels", "map"):
        raise ValueError(kind)
    # Uniform noise alone almost never leaves a 2**L block unmarked at L = 3, so the coarsest
    # level would be missing: each mask is a rectangle plus sparse noise (its own density per
    # image, thinner for coarser levels' masks), redrawn until every image mixes every level
    # the grid allows (mixable_levels). If none of 50 draws does, that is an error: the best
    # draw would let a test run without the coarsest level, silently.
    want = mixable_levels(grid, num_levels)
    best = None
    for _ in range(50):
        masks = [_blob_masks(rng, batch, H, W, 4.0 ** -l)
                 for l in range(1 if kind == "keep" else num_levels)]
        levels = ref.levels_from_masks(masks, num_levels)
        worst = min(len(np.unique(levels[b])) for b in range(batch))
        if best is None or worst > best[0]:
            best = (worst, masks)
        if worst == want:
            break
    else:
        raise ValueError(
            f"random_masks: no draw in 50 mixes the {want} levels a {H}x{W} grid allows at "
            f"num_levels={num_levels} ({kind!r}) in every image (at best {best[0]}); use "
            "emulation.mixed_masks (it redraws longer), a larger grid or fewer levels")
    masks = best[1]
    if kind == "keep":
        return torch.from_numpy(masks[0]), masks
    if kind == "levels":
        return [torch.from_numpy(m) for m in masks], masks
    if kind == "map":
        levels = ref.levels_from_masks(masks, num_levels)
        return torch.from_numpy(levels), masks
    raise ValueError(kind)


def mixable_levels(grid, num_levels: int) -> int:
    """How many levels one image of ``grid`` can mix at ``num_levels``: level 0 and each level
    ``s`` whose ``2**s`` blocks do not cover the grid (a kept cell in the top-left corner makes
    every such level appear next to it; a level whose block covers the grid cannot appear
    beside a kept cell)."""
    return 1 + sum(1 for s in range(1, num_levels + 1) if max(grid) > 2 ** s)


def _blob_masks(rng, batch, H, W, scale):
    """Per image: a random rectangle (up to half of each side) and uniform noise of a random
    density up to ``0.06 * scale``."""
    m = rng.uniform(size=(batch, H, W)) < rng.uniform(0, 0.06 * scale, size=(batch, 1, 1))
    for b in range(batch):
        h, w = rng.integers(1, max(1, H // 2) + 1), rng.integers(1, max(1, W // 2) + 1)
        y, x = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
        m[b, y:y + h, x:x + w] = True
    return m


def make_input(case, step, channels, dtype, device, seed=0):
    grid, L, kind = case
    rng = np.random.default_rng(seed)
    spec, masks = random_masks(rng, 3, grid, L, kind)
    levels = ref.levels_from_masks(masks, L)
    plan = LevelPlan.from_level_map(torch.from_numpy(levels).to(device), L)
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(plan.num_sites(step), channels, generator=gen, dtype=dtype).to(device)
    return CADTensor(feats, plan, step), levels


def synthetic_items(n, size=(40, 56), seed=0):
    """Flat backgrounds with two kinds of coloured rectangles: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    colors = torch.tensor([[-1.0, -1.0, -1.0], [1.5, -0.5, 0.0], [0.0, 1.0, 1.5]])
    items = []
    for i in range(n):
        t = torch.zeros(*size, dtype=torch.int64)
        for c in (1, 2):
            y = int(torch.randint(0, size[0] - 16, (1,), generator=g))
            x = int(torch.randint(0, size[1] - 16, (1,), generator=g))
            t[y:y + 14, x:x + 14] = c
        t[:2] = 255
        img = colors[t.clamp(max=2)].permute(2, 0, 1) + 0.2 * torch.randn(3, *size, generator=g)
        items.append({"image": img, "target": t, "id": f"img{i}"})
    return items


def tol(dtype):
    """Tolerances of a sparse op against the dense reference in ``dtype``."""
    return dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)


def file_version(path):
    """What changes whenever ``path`` is written: its inode (our files are replaced atomically),
    mtime and size. The mtime alone can miss a rewrite within one tick of the kernel's coarse
    clock."""
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size
