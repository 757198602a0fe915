#!/usr/bin/env bash
# Build .carry/ (ignored): everything a GPU session needs that the device machine lacks.
#
#   bash dev/gpu/gpu_carry.sh          # here, before calling the device tool
#
# The device machine (Python 3.12, torch cu130, no internet, no spconv) gets the working tree
# plus the paths named in `carry`, 64 MiB in all. spconv-cu126's wheel alone is 70.5 MB, so the
# two big wheels travel as .tar.xz of their unpacked contents (dist-info included, so
# importlib.metadata -- and cad_spconv.backend's wheel check -- sees `spconv-cu126` once they
# are unpacked into a folder on PYTHONPATH); the pure-Python dependencies travel as wheels;
# the three Cityscapes frames are copied because ../shared does not travel.
# dev/gpu/gpu_session.sh unpacks and uses all of it on the device.
#
# Wheels are read from .whl/ (WHL_DIR), never downloaded here; a missing one is an error that
# prints the download command. Idempotent: unchanged inputs are not repacked (xz -9 of
# spconv takes about a minute and a half on two cores). Fails if what would travel is over
# CARRY_LIMIT_MIB (default 60) MiB.
set -euo pipefail

ROOT=$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)
cd "$ROOT"
WHL=${WHL_DIR:-$ROOT/.whl}
CARRY=$ROOT/.carry
FRAMES_SRC=${FRAMES_SRC:-$ROOT/../shared/data/cityscapes_frames}
LIMIT_MIB=${CARRY_LIMIT_MIB:-60}
PY=${PYTHON:-python3}

die() { echo "gpu_carry: $*" >&2; exit 1; }

# .carry/ must be ignored, else it would also travel as untracked files (and be committed)
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF '/.carry/' "$EXCLUDE" 2>/dev/null || { echo '/.carry/' >>"$EXCLUDE"; echo "added /.carry/ to $EXCLUDE"; }
git check-ignore -q .carry/x || die ".carry/ is not ignored by git; add '/.carry/' to $EXCLUDE"

BIG=(spconv_cu126 cumm_cu126)                        # repacked as .tar.xz
SMALL=(pccm ccimport fire lark termcolor             # carried as wheels
       fvcore iopath yacs ptflops)                   # the MAC-count tests' references (fvcore
                                                     # has no wheel: `pip wheel --no-deps -w .whl`)
DOWNLOAD="python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
--platform manylinux2014_x86_64 -d .whl"

one_wheel() {  # the single wheel of a distribution in $WHL
    local found=("$WHL"/"$1"-*.whl)
    [[ -e ${found[0]} ]] || die "no $1 wheel in $WHL; fetch it here with: $DOWNLOAD <name>==<version>"
    ((${#found[@]} == 1)) || die "several $1 wheels in $WHL (${found[*]##*/}): keep one"
    echo "${found[0]}"
}

mkdir -p "$CARRY/frames"
keep=(frames)

repack() {  # wheel -> .carry/<wheel name>.tar.xz of its unpacked contents
    local whl=$1 out=$CARRY/$(basename "${1%.whl}").tar.xz tmp
    if [[ -s $out && $out -nt $whl ]]; then
        echo "up to date: ${out#$ROOT/}"
        return
    fi
    tmp=$(mktemp -d)
    echo "repacking ${whl##*/} (xz -9) ..."
    "$PY" -m zipfile -e "$whl" "$tmp/"
    tar -C "$tmp" --sort=name --owner=0 --group=0 --numeric-owner -cf - . | xz -9 -T1 >"$out.part"
    rm -rf "$tmp"
    mv "$out.part" "$out"
}

pids=()
for name in "${BIG[@]}"; do
    whl=$(one_wheel "$name")
    keep+=("$(basename "${whl%.whl}").tar.xz")
    repack "$whl" & pids+=($!)
done
for name in "${SMALL[@]}"; do
    whl=$(one_wheel "$name")
    keep+=("${whl##*/}")
    cmp -s "$whl" "$CARRY/${whl##*/}" || cp "$whl" "$CARRY/"
done
for pid in "${pids[@]}"; do wait "$pid" || die "repacking failed"; done

# drop anything else (an older version would make two copies of one package on the device)
for f in "$CARRY"/*; do
    base=${f##*/}
    [[ " ${keep[*]} " == *" $base "* ]] || { echo "removing stale ${f#$ROOT/}"; rm -rf "$f"; }
done

# each archive must hold its dist-info (Name: spconv-cu126 / cumm-cu126) at the top level
for name in "${BIG[@]}"; do
    arch=("$CARRY"/"$name"-*.tar.xz)
    listing=$(tar -tJf "${arch[0]}")  # (not piped into grep -q: SIGPIPE + pipefail)
    grep -qE "^\./${name}-[^/]+\.dist-info/METADATA$" <<<"$listing" \
        || die "${arch[0]##*/} has no top-level ${name}-*.dist-info/METADATA"
done

# frames
shopt -s nullglob
src=("$FRAMES_SRC"/*.png)
if ((${#src[@]})); then
    for f in "${src[@]}"; do cmp -s "$f" "$CARRY/frames/${f##*/}" || cp "$f" "$CARRY/frames/"; done
    chmod u+w "$CARRY"/frames/*.png
fi
have=("$CARRY"/frames/*.png)
((${#have[@]})) || die "no frames: $FRAMES_SRC has no PNG and $CARRY/frames is empty"

# what travels: tracked + untracked-not-ignored files, plus .carry
"$PY" - "$LIMIT_MIB" <<'EOF' || exit 1
import os, subprocess, sys
limit = float(sys.argv[1])
names = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], check=True,
                       capture_output=True).stdout.decode().split("\0")
tree = sum(os.path.getsize(n) for n in set(names) if n and os.path.isfile(n))
carry = {}
for dirpath, _, files in os.walk(".carry"):
    for f in files:
        p = os.path.join(dirpath, f)
        carry[p] = os.path.getsize(p)
mib = lambda b: b / 2 ** 20
for p, b in sorted(carry.items()):
    print(f"  {mib(b):6.2f} MiB  {p}")
total = tree + sum(carry.values())
print(f"working tree {mib(tree):.2f} MiB + .carry {mib(sum(carry.values())):.2f} MiB = "
      f"{mib(total):.2f} MiB (device limit 64 MiB, this check {limit:g} MiB)")
if mib(total) > limit:
    sys.exit(f"gpu_carry: {mib(total):.2f} MiB would travel, over {limit:g} MiB: the device call "
             "would be refused; move large untracked files out of the tree or ignore them")
EOF
echo "ready. Device call: run(command='bash dev/gpu/gpu_session.sh tests bench', carry=['.carry'], timeout_s=600)"
