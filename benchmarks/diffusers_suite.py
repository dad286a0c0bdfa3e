"""diffusers' own pipeline tests against x2edit's pipelines, side by side with stock, offline.

Runs ``tests/pipelines/flux/test_pipeline_flux_fill.py`` (``PipelineTesterMixin`` + the Fill tests) with
``pipeline_class`` set to ``X2EditDiptychPipeline`` and to stock ``FluxFillPipeline``, and the Kontext tests
with ``X2EditPipeline`` and stock ``FluxKontextPipeline``, from a diffusers checkout (``fetch`` one; its
``tests/`` tree is copied out, nothing is installed). The tests load two tiny tokenizers and a T5 config
from the hub; here they come from the bundled MiniLM tokenizer and a local T5 config of the same size, and
the tiny CLIP's vocabulary is widened to fit that tokenizer; x2edit's classes are made visible in
``diffusers.pipelines``, where one test looks a pipeline's source up by name. Both classes run in the same
harness. The tests need ``pip install parameterized requests-mock`` (diffusers' test extras).

    python benchmarks/diffusers_suite.py --diffusers /path/to/diffusers --out benchmarks/results/diffusers_suite

Writes results.json (per class: passed / failed / skipped, and each failure's first line) and results.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

SUITES = {  # test file -> (test class, x2edit's pipeline class, stock's)
    "tests/pipelines/flux/test_pipeline_flux_fill.py": (
        "FluxFillPipelineFastTests", "x2edit.pipeline_diptych:X2EditDiptychPipeline", "diffusers:FluxFillPipeline"),
    "tests/pipelines/flux/test_pipeline_flux_kontext.py": (
        "FluxKontextPipelineFastTests", "x2edit.pipeline:X2EditPipeline", "diffusers:FluxKontextPipeline"),
}

# A pytest plugin: offline stand-ins for the hub files the tests read, and the class under test.
PLUGIN = '''
import importlib, os
import transformers
from x2edit.testing import minilm_path

_tok = transformers.AutoTokenizer.from_pretrained
def _offline_tokenizer(max_length):
    def load(name, *a, **k):
        tok = _tok(minilm_path())
        tok.model_max_length = max_length
        return tok
    return staticmethod(load)
transformers.CLIPTokenizer.from_pretrained = _offline_tokenizer(77)  # CLIP's length
transformers.AutoTokenizer.from_pretrained = _offline_tokenizer(512)
_cfg = transformers.AutoConfig.from_pretrained
def _offline_config(name, *a, **k):
    if "t5" in str(name):  # hf-internal-testing/tiny-random-t5's sizes, MiniLM's vocabulary
        return transformers.T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=37, num_layers=5, num_heads=4,
                                     relative_attention_num_buckets=8)
    return _cfg(name, *a, **k)
transformers.AutoConfig.from_pretrained = staticmethod(_offline_config)
_clip_init = transformers.CLIPTextConfig.__init__
def _clip_config(self, *a, vocab_size=49408, **k):
    _clip_init(self, *a, vocab_size=max(vocab_size, 30522), **k)
transformers.CLIPTextConfig.__init__ = _clip_config

def pytest_collection_modifyitems(items):
    name, target = os.environ["SUITE_CLASS"].split("=")
    module, attr = target.split(":")
    cls = getattr(importlib.import_module(module), attr)
    # test_encode_prompt_works_in_isolation reads encode_prompt's source from diffusers.pipelines.<class name>:
    # a pipeline outside diffusers is made visible there, so the test reads its own encode_prompt
    import diffusers.pipelines
    setattr(diffusers.pipelines, attr, cls)
    for item in items:
        if item.cls is not None and item.cls.__name__ == name:
            item.cls.pipeline_class = cls
'''


def run_suite(tests_root: Path, test_file: str, test_class: str, target: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        env = {**__import__("os").environ, "SUITE_CLASS": f"{test_class}={target}", "PYTHONPATH": str(tests_root),
               "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "suite_plugin", "-p", "no:cacheprovider",
                        f"--junitxml={xml}", test_file], cwd=tests_root, env=env, capture_output=True, text=True)
        root = ET.parse(xml).getroot()
    out = {"passed": 0, "failed": 0, "skipped": 0, "failures": {}}
    for case in root.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            out["failed"] += 1
            out["failures"][case.get("name")] = (bad.get("message") or "").splitlines()[0][:200]
        elif case.find("skipped") is not None:
            out["skipped"] += 1
        else:
            out["passed"] += 1
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffusers", required=True, help="a diffusers git checkout or bare repository")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        archive = subprocess.run(["git", "-C", args.diffusers, "archive", "HEAD", "tests"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
        commit = subprocess.run(["git", "-C", args.diffusers, "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        (root / "suite_plugin.py").write_text(PLUGIN)
        results = {"diffusers_tests_commit": commit, "suites": {}}
        for test_file, (test_class, ours, stock) in SUITES.items():
            for target in (ours, stock):
                r = run_suite(root, test_file, test_class, target)
                results["suites"][f"{test_class} / {target.split(':')[1]}"] = r
                print(f"{test_class} with {target}: {r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped")
    import diffusers

    results["diffusers_installed"] = diffusers.__version__
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"diffusers' tests at {results['diffusers_tests_commit'][:10]}, installed diffusers "
             f"{results['diffusers_installed']}", "", "| test class / pipeline | passed | failed | skipped |",
             "|---|---:|---:|---:|"]
    for name, r in results["suites"].items():
        lines.append(f"| {name} | {r['passed']} | {r['failed']} | {r['skipped']} |")
    lines.append("")
    for name, r in results["suites"].items():
        for test, message in r["failures"].items():
            lines.append(f"- {name}: `{test}`: {message}")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
