"""Community LoRAs on X2EditPipeline, side by side with stock FluxKontextPipeline on the same file and seed.

Each key layout (kohya sd-scripts, ComfyUI, XLabs, diffusers/PEFT with and without metadata) is built
for the tiny transformer (1 double + 1 single block, inner dim 32) and checked two ways: against the
layout's own meaning (each module's update = alpha / r * up @ down, from the raw file) and against
stock's output where stock loads the file. The LoRA methods are checked against stock one by one,
and against an x2edit MoE-LoRA that they must leave alone. What stock loads beyond plain pairs loads too
(PEFT DoRA and lora_bias files, kohya DoRA / fp16 / text-encoder / final_layer files, ComfyUI's lora_A form,
FLUX.1 Control LoRAs), each checked against stock on the same file.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn
from diffusers import FluxKontextPipeline
from safetensors.torch import save_file

from x2edit import X2EditPipeline
from x2edit.adapters import AdapterConfig, adapter_layers, adapter_names, inject_adapters
from x2edit.testing import (
    randomize_adapters,
    tiny_flux_inputs,
    tiny_flux_transformer,
    tiny_kontext_components,
)

KW = dict(num_inference_steps=2, max_sequence_length=16, output_type="np")
ATOL = 2e-4


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _pipes():
    """(ours, stock), built from the same seeded tiny components."""
    ours, stock = X2EditPipeline(**tiny_kontext_components(0)), FluxKontextPipeline(**tiny_kontext_components(0))
    for p in (ours, stock):
        p.set_progress_bar_config(disable=True)
    return ours, stock


def _edit(pipe, image, **kwargs):
    if isinstance(pipe, X2EditPipeline):
        return pipe(image, "make it red", generator=_gen(0), **KW, **kwargs).images
    return pipe(image=image, prompt="make it red", height=20, width=24, max_area=480, _auto_resize=False,
                generator=_gen(0), **KW, **kwargs).images


def _same(ours, stock, image, **kwargs):
    """Both pipelines' edits agree; returns ours."""
    a = _edit(ours, image, **kwargs)
    np.testing.assert_allclose(a, _edit(stock, image, **kwargs), atol=ATOL)
    return a


def _loaded(path, image):
    """(ours, stock) with the file loaded as "style" in both, and stock's edit of ``image`` before it."""
    ours, stock = _pipes()
    base = _edit(stock, image)
    for p in (ours, stock):
        p.load_lora_weights(path, adapter_name="style")
    return ours, stock, base


def _differ(a, b):
    assert np.abs(a - b).max() > 1e-2


def _rand(*shape, seed):
    return torch.randn(*shape, generator=_gen(seed)) * 0.3


def _delta(pipe, module, name):
    """(N, K) update the adapter ``name`` adds to ``module`` of the pipeline's transformer."""
    return pipe.transformer.get_submodule(module).adapters[name].delta_weight()


# Linears of the tiny transformer a diffusers/PEFT test file targets: name -> (in, out).
PEFT_MODULES = {"transformer_blocks.0.attn.to_q": (32, 32), "transformer_blocks.0.attn.to_v": (32, 32),
                "transformer_blocks.0.ff.net.0.proj": (32, 128), "single_transformer_blocks.0.attn.to_k": (32, 32),
                "single_transformer_blocks.0.proj_out": (160, 32)}


def _peft_state(ranks: dict[str, int] | None = None, seed=1) -> dict:
    """{module.lora_A/B.weight} for PEFT_MODULES (rank 4 unless ``ranks`` says otherwise), unprefixed."""
    state = {}
    for i, (m, (k, n)) in enumerate(PEFT_MODULES.items()):
        r = (ranks or {}).get(m, 4)
        state[f"{m}.lora_A.weight"] = _rand(r, k, seed=seed + 2 * i)
        state[f"{m}.lora_B.weight"] = _rand(n, r, seed=seed + 2 * i + 1)
    return state


def _save_peft(directory, state, metadata=None):
    """Write ``state`` as diffusers' save_lora_weights does (keys prefixed ``transformer.``)."""
    FluxKontextPipeline.save_lora_weights(directory, transformer_lora_layers=state,
                                          transformer_lora_adapter_metadata=metadata)
    return directory / "pytorch_lora_weights.safetensors"


@pytest.fixture
def lora_file(tmp_path):
    """A diffusers/PEFT LoRA with metadata lora_alpha=8, r=4 (strength 2): the file of the method tests."""
    return _save_peft(tmp_path, _peft_state(), {"r": 4, "lora_alpha": 8, "target_modules": list(PEFT_MODULES)})


# -- strength ------------------------------------------------------------------------------------
@pytest.mark.parametrize("metadata,ranks,scale", [
    ({"r": 4, "lora_alpha": 8}, {}, {}),  # every module 8/4
    ({"r": 4, "lora_alpha": 8, "use_rslora": True}, {}, dict.fromkeys(PEFT_MODULES, 8 / 2)),  # alpha / sqrt(r)
    ({"r": 4, "lora_alpha": 8, "rank_pattern": {"transformer_blocks.0.attn.to_v": 2},
      "alpha_pattern": {"proj_out": 3, "transformer_blocks.0.attn.to_v": 6}},
     {"transformer_blocks.0.attn.to_v": 2},
     {"transformer_blocks.0.attn.to_v": 6 / 2, "single_transformer_blocks.0.proj_out": 3 / 4}),
], ids=["alpha", "rslora", "patterns"])
def test_peft_metadata_sets_each_modules_strength_as_stock(metadata, ranks, scale, tmp_path, source_image):
    """save_lora_weights' metadata comes back prefixed (transformer.lora_alpha, ...): read, as PEFT
    reads it, it sets every module's scale."""
    state = _peft_state(ranks)
    path = _save_peft(tmp_path, state, {**metadata, "target_modules": list(PEFT_MODULES)})
    ours, stock, base = _loaded(path, source_image)
    for m in PEFT_MODULES:
        expected = scale.get(m, 2.0) * state[f"{m}.lora_B.weight"] @ state[f"{m}.lora_A.weight"]
        torch.testing.assert_close(_delta(ours, m, "style"), expected)
    _differ(_same(ours, stock, source_image), base)


@pytest.mark.parametrize("with_alphas", [True, False])
def test_diffusers_file_without_metadata_uses_alpha_tensors_as_stock(with_alphas, tmp_path, source_image):
    """.alpha tensors beside lora_A/lora_B (no metadata): per module alpha / r; a module without one
    gets the file's default alpha as diffusers' get_peft_kwargs picks it (here 8), not its rank;
    without any alpha, scale 1."""
    state = {f"transformer.{k}": v for k, v in _peft_state().items()}
    modules = list(PEFT_MODULES)
    alphas = {modules[0]: 8.0, modules[1]: 8.0, modules[2]: 2.0} if with_alphas else {}
    state.update({f"transformer.{m}.alpha": torch.tensor(a) for m, a in alphas.items()})
    save_file(state, str(tmp_path / "lora.safetensors"))
    ours, stock = _pipes()
    for p in (ours, stock):
        p.load_lora_weights(tmp_path / "lora.safetensors", adapter_name="style")
    for m in modules:
        scale = alphas.get(m, 8.0) / 4 if with_alphas else 1.0
        expected = scale * state[f"transformer.{m}.lora_B.weight"] @ state[f"transformer.{m}.lora_A.weight"]
        torch.testing.assert_close(_delta(ours, m, "style"), expected)
    _same(ours, stock, source_image)


# -- key layouts ---------------------------------------------------------------------------------
# kohya modules of the tiny model, by their original FLUX (BFL) names: name -> (in, out, rank, alpha,
# the diffusers modules its output rows split into, in order). The single block's fused linear1 is
# left out: see test_kohya_single_block_linear1_converts_only_at_flux_size.
KOHYA = {
    "double_blocks.0.img_attn.qkv": (32, 96, 4, 8.0, ["transformer_blocks.0.attn.to_q",
                                                      "transformer_blocks.0.attn.to_k",
                                                      "transformer_blocks.0.attn.to_v"]),
    "double_blocks.0.img_attn.proj": (32, 32, 4, 2.0, ["transformer_blocks.0.attn.to_out.0"]),
    "double_blocks.0.txt_attn.qkv": (32, 96, 2, 1.0, ["transformer_blocks.0.attn.add_q_proj",
                                                      "transformer_blocks.0.attn.add_k_proj",
                                                      "transformer_blocks.0.attn.add_v_proj"]),
    "double_blocks.0.img_mlp.0": (32, 128, 4, 8.0, ["transformer_blocks.0.ff.net.0.proj"]),
    "double_blocks.0.img_mod.lin": (32, 192, 4, 4.0, ["transformer_blocks.0.norm1.linear"]),
    "single_blocks.0.linear2": (160, 32, 4, 12.0, ["single_transformer_blocks.0.proj_out"]),
    "single_blocks.0.modulation.lin": (32, 96, 4, 8.0, ["single_transformer_blocks.0.norm.linear"]),
}


def _kohya_key(name: str, comfyui: bool = False) -> str:
    """sd-scripts: lora_unet_double_blocks_0_img_attn_qkv; ComfyUI: diffusion_model.double_blocks.0.img_attn.qkv."""
    return f"diffusion_model.{name}" if comfyui else "lora_unet_" + name.replace(".", "_")


def _kohya_state(modules: dict, comfyui: bool = False) -> dict:
    """KEY.lora_down.weight (r, in), KEY.lora_up.weight (out, r), KEY.alpha for each module."""
    state = {}
    for i, (name, (k, n, r, alpha, _)) in enumerate(modules.items()):
        key = _kohya_key(name, comfyui)
        state[f"{key}.lora_down.weight"] = _rand(r, k, seed=10 + 2 * i)
        state[f"{key}.lora_up.weight"] = _rand(n, r, seed=11 + 2 * i)
        state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


def _check_kohya_deltas(pipe, state: dict, modules: dict, comfyui: bool = False, name: str = "style") -> None:
    """Each diffusers module's update is alpha / r * (its rows of up) @ down, as sd-scripts applies it."""
    for kohya_name, (_, _, r, alpha, targets) in modules.items():
        key = _kohya_key(kohya_name, comfyui)
        up, down = state[f"{key}.lora_up.weight"], state[f"{key}.lora_down.weight"]
        for target, up_rows in zip(targets, torch.split(up, up.shape[0] // len(targets))):
            torch.testing.assert_close(_delta(pipe, target, name), alpha / r * up_rows @ down)


@pytest.mark.parametrize("comfyui", [False, True], ids=["kohya", "comfyui"])
def test_kohya_and_comfyui_files_apply_their_alpha_and_match_stock(comfyui, tmp_path, source_image):
    state = _kohya_state(KOHYA, comfyui)
    save_file(state, str(tmp_path / "lora.safetensors"))
    ours, stock, base = _loaded(tmp_path / "lora.safetensors", source_image)
    _check_kohya_deltas(ours, state, KOHYA, comfyui)
    _differ(_same(ours, stock, source_image), base)


def test_kohya_keys_diffusers_converts_without_prefix_are_applied():
    """diffusers' kohya converter writes img_in / final_layer as unprefixed ``x_embedder`` /
    ``proj_out`` keys (stock then drops them: its loader keeps only ``transformer.`` keys). They
    belong to the transformer: x2edit applies them, with their alpha (a final_layer alpha, which the
    converter drops, too: see test_kohya_final_layer_alpha_is_applied_at_alpha_over_rank)."""
    modules = {**KOHYA, "img_in": (16, 32, 4, 2.0, ["x_embedder"]),
               "final_layer.linear": (32, 16, 4, 4.0, ["proj_out"])}
    state = _kohya_state(modules)
    ours, _ = _pipes()
    ours.load_lora_weights(state, adapter_name="style")
    _check_kohya_deltas(ours, state, modules)


def _xlabs_state() -> dict:
    """XLabs keys (no alpha: XLabs applies up @ down as is)."""
    shapes = {"double_blocks.0.processor.qkv_lora1": (32, 96), "double_blocks.0.processor.proj_lora1": (32, 32),
              "double_blocks.0.processor.qkv_lora2": (32, 96), "double_blocks.0.processor.proj_lora2": (32, 32),
              "single_blocks.0.processor.qkv_lora": (32, 96), "single_blocks.0.processor.proj_lora": (160, 32)}
    state = {}
    for i, (key, (k, n)) in enumerate(shapes.items()):
        state[f"{key}.down.weight"] = _rand(4, k, seed=30 + 2 * i)
        state[f"{key}.up.weight"] = _rand(n, 4, seed=31 + 2 * i)
    return state


def test_xlabs_file_matches_stock(tmp_path, source_image):
    state = _xlabs_state()
    save_file(state, str(tmp_path / "lora.safetensors"))
    ours, stock, base = _loaded(tmp_path / "lora.safetensors", source_image)
    targets = {"double_blocks.0.processor.qkv_lora1": ["transformer_blocks.0.attn.to_q",
                                                       "transformer_blocks.0.attn.to_k",
                                                       "transformer_blocks.0.attn.to_v"],
               "double_blocks.0.processor.proj_lora2": ["transformer_blocks.0.attn.to_add_out"],
               "single_blocks.0.processor.qkv_lora": ["single_transformer_blocks.0.attn.to_q",
                                                      "single_transformer_blocks.0.attn.to_k",
                                                      "single_transformer_blocks.0.attn.to_v"],
               "single_blocks.0.processor.proj_lora": ["single_transformer_blocks.0.proj_out"]}
    for key, modules in targets.items():
        up, down = state[f"{key}.up.weight"], state[f"{key}.down.weight"]
        for module, rows in zip(modules, torch.split(up, up.shape[0] // len(modules))):
            torch.testing.assert_close(_delta(ours, module, "style"), rows @ down)
    _differ(_same(ours, stock, source_image), base)


def _zero_linear(k: int, n: int) -> nn.Linear:
    """An (n, k) linear whose weight is a single stored zero, expanded: FLUX.1 shapes at no memory cost."""
    linear = nn.Linear(1, 1, bias=False)
    linear.in_features, linear.out_features = k, n
    linear.weight = nn.Parameter(torch.zeros(()).expand(n, k), requires_grad=False)
    return linear


def test_kohya_single_block_linear1_converts_only_at_flux_size():
    """diffusers splits linear1 (q, k, v, mlp) at FLUX.1's sizes (3 x 3072 + 12288 rows), hard-coded:
    refused with a clear error at the tiny size, placed correctly on a FLUX.1-size model."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    ours, _ = _pipes()
    tiny = {"single_blocks.0.linear1": (32, 96 + 128, 4, 8.0, [])}
    with pytest.raises(ValueError, match="only into FLUX.1-size") as e:
        ours.load_lora_weights(_kohya_state(tiny))
    assert "\n" not in str(e.value) and adapter_names(ours.transformer) == []

    with init_empty_weights():  # FLUX.1 sizes, meta device
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1)
    targets = ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
               "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp"]
    for name in targets:  # real (zero) weights where the LoRA goes, so its values can be read back
        parent, child = name.rsplit(".", 1)
        old = model.get_submodule(name)
        setattr(model.get_submodule(parent), child, _zero_linear(old.in_features, old.out_features))
    full = {"single_blocks.0.linear1": (3072, 3 * 3072 + 12288, 4, 8.0, targets)}
    state = _kohya_state(full)
    from x2edit.adapters import load_community_lora

    assert load_community_lora(model, dict(state), "style") == sorted(targets)
    up = state["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    down = state["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    probe = _rand(3072, seed=99)
    for name, rows in zip(targets, torch.split(up, [3072, 3072, 3072, 12288])):
        lora = model.get_submodule(name).adapters["style"]
        ours_out = lora.scaling * lora.lora_B[0] @ (lora.lora_A[0] @ probe)  # the update applied to a probe
        torch.testing.assert_close(ours_out, 8.0 / 4 * rows @ (down @ probe), rtol=1e-4, atol=1e-4)


# -- the LoRA methods, side by side with stock -----------------------------------------------------
def test_scale_weights_and_names_match_stock(lora_file, tmp_path, source_image):
    ours, stock = _pipes()
    base = _edit(stock, source_image)
    for p in (ours, stock):
        p.load_lora_weights(lora_file)  # unnamed: default_0, as stock names it
    full = _same(ours, stock, source_image)
    _differ(full, base)
    half = _same(ours, stock, source_image, joint_attention_kwargs={"scale": 0.5})
    _differ(half, full)
    np.testing.assert_allclose(_edit(ours, source_image), full, atol=1e-6)  # the scale lasts one call
    _same(ours, stock, source_image, joint_attention_kwargs={"scale": 0.0})

    other = _save_peft(tmp_path / "other", _peft_state(seed=50),
                       {"r": 4, "lora_alpha": 4, "target_modules": list(PEFT_MODULES)})
    for p in (ours, stock):
        p.load_lora_weights(other)
        p.set_adapters(["default_0", "default_1"], [0.7, -0.4])
    _same(ours, stock, source_image)
    assert ours.get_list_adapters() == stock.get_list_adapters() == {"transformer": ["default_0", "default_1"]}
    for p in (ours, stock):
        p.set_adapters("default_1")
    assert ours.get_active_adapters() == stock.get_active_adapters() == ["default_1"]
    _same(ours, stock, source_image)
    for p in (ours, stock):
        p.delete_adapters("default_1")
    assert ours.get_list_adapters() == stock.get_list_adapters() == {"transformer": ["default_0"]}
    # Stock (PEFT) then switches default_0 back on, with a warning; x2edit switches nothing on by itself.
    assert ours.get_active_adapters() == []


def test_fuse_unfuse_and_unload_match_stock(lora_file, source_image):
    ours, stock, base = _loaded(lora_file, source_image)
    full = _edit(stock, source_image)
    half = _edit(stock, source_image, joint_attention_kwargs={"scale": 0.5})
    for p in (ours, stock):
        p.fuse_lora(lora_scale=0.5)
    assert ours.fused_loras == stock.fused_loras == {"style"} and ours.num_fused_loras == 1
    np.testing.assert_allclose(_same(ours, stock, source_image), half, atol=ATOL)
    # A fused LoRA is in the base weights: a call's scale no longer reaches it (as stock).
    np.testing.assert_allclose(_same(ours, stock, source_image, joint_attention_kwargs={"scale": 2.0}), half,
                               atol=ATOL)
    for p in (ours, stock):
        p.unfuse_lora()
    assert ours.fused_loras == stock.fused_loras == set()
    # Unfused, the LoRA keeps fuse_lora's lora_scale (stock: PEFT's scale_layer is not undone) ...
    np.testing.assert_allclose(_same(ours, stock, source_image), half, atol=ATOL)
    for p in (ours, stock):
        p.set_adapters("style", 1.0)  # ... until set_adapters gives it a weight again
    np.testing.assert_allclose(_same(ours, stock, source_image), full, atol=ATOL)

    # fuse_lora + unload_lora_weights bakes the LoRA into the base weights.
    for p in (ours, stock):
        p.fuse_lora()
        p.unload_lora_weights()
    assert ours.get_list_adapters() == stock.get_list_adapters() == {}
    assert ours.get_active_adapters() == stock.get_active_adapters() == []
    assert not list(adapter_layers(ours.transformer))  # plain linears again
    np.testing.assert_allclose(_same(ours, stock, source_image), full, atol=ATOL)
    assert np.abs(full - base).max() > 1e-2


def test_disable_enable_and_unload_match_stock(lora_file, source_image):
    ours, stock, base = _loaded(lora_file, source_image)
    for p in (ours, stock):
        p.set_adapters("style", 0.6)
    weighted = _same(ours, stock, source_image)
    _differ(weighted, base)
    for p in (ours, stock):
        p.disable_lora()
    np.testing.assert_allclose(_same(ours, stock, source_image), base, atol=ATOL)
    assert ours.get_active_adapters() == stock.get_active_adapters() == ["style"]  # still active, only disabled
    for p in (ours, stock):
        p.enable_lora()
    np.testing.assert_allclose(_same(ours, stock, source_image), weighted, atol=ATOL)  # with its weight
    for p in (ours, stock):
        p.unload_lora_weights()
    np.testing.assert_allclose(_same(ours, stock, source_image), base, atol=ATOL)
    assert ours.get_list_adapters() == stock.get_list_adapters() == {}


# -- beside an x2edit MoE-LoRA ------------------------------------------------------------------------
def _moe_pipe():
    pipe = X2EditPipeline(**tiny_kontext_components(0))
    pipe.set_progress_bar_config(disable=True)
    inject_adapters(pipe.transformer, AdapterConfig(rank=4, num_experts=3, top_k=2))
    randomize_adapters(pipe.transformer, std=0.2)
    return pipe


def _moe_edit(pipe, image, **kwargs):
    return pipe(image, "make it red", task="color_change", generator=_gen(0), **KW, **kwargs).images


def test_lora_methods_leave_the_moe_lora_alone(lora_file, source_image, caplog):
    pipe = _moe_pipe()
    moe = _moe_edit(pipe, source_image)
    pipe.load_lora_weights(lora_file, adapter_name="style")
    both = _moe_edit(pipe, source_image)
    _differ(both, moe)
    assert pipe.get_list_adapters() == {"transformer": ["default", "style"]}
    assert pipe.get_active_adapters() == ["default", "style"]

    # A call's scale reaches the LoRA only: at 0 the MoE-LoRA's edit is left, whole.
    np.testing.assert_allclose(_moe_edit(pipe, source_image, joint_attention_kwargs={"scale": 0.0}), moe, atol=1e-6)
    pipe.disable_lora()
    np.testing.assert_allclose(_moe_edit(pipe, source_image), moe, atol=1e-6)
    pipe.enable_lora()
    np.testing.assert_allclose(_moe_edit(pipe, source_image), both, atol=1e-6)

    pipe.fuse_lora()
    assert pipe.fused_loras == {"style"}
    assert all("default" not in layer.merged for _, layer in adapter_layers(pipe.transformer))
    np.testing.assert_allclose(_moe_edit(pipe, source_image), both, atol=ATOL)
    with pytest.raises(ValueError, match="not a LoRA loaded with load_lora_weights"):
        pipe.fuse_lora(adapter_names=["default"])
    pipe.unfuse_lora()
    np.testing.assert_allclose(_moe_edit(pipe, source_image), both, atol=ATOL)

    with caplog.at_level("WARNING", logger="x2edit.pipeline_lora"):
        pipe.set_adapters("style")  # as a diffusers script would: the editing adapter goes off, said once
    assert "switches off the x2edit editing adapter ['default']" in caplog.text
    pipe.set_adapters(["default", "style"], [1.0, 0.0])
    np.testing.assert_allclose(_moe_edit(pipe, source_image), moe, atol=1e-6)

    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {"transformer": ["default"]}
    np.testing.assert_allclose(_moe_edit(pipe, source_image), moe, atol=1e-6)


def test_exported_task_lora_reproduces_the_donor_and_runs_beside_a_moe_lora(tmp_path, source_image):
    """A task-routed MoE-LoRA exported as a diffusers LoRA edits as its donor did, alone on the base;
    beside another MoE-LoRA both run, and weight 0 switches the LoRA off exactly."""
    from x2edit.adapters import export_diffusers_lora

    donor = X2EditPipeline(**tiny_kontext_components(0))
    donor.set_progress_bar_config(disable=True)
    inject_adapters(donor.transformer, AdapterConfig(rank=4, num_experts=3, top_k=2, router="task"))
    randomize_adapters(donor.transformer, std=0.2)
    export_diffusers_lora(donor.transformer, tmp_path, task="style_change")
    path = tmp_path / "pytorch_lora_weights.safetensors"

    plain, _ = _pipes()
    plain.load_lora_weights(path, adapter_name="style")
    expected = donor(source_image, "x", task="style_change", generator=_gen(0), **KW).images
    np.testing.assert_allclose(plain(source_image, "x", generator=_gen(0), **KW).images, expected, atol=ATOL)

    pipe = _moe_pipe()
    moe = _moe_edit(pipe, source_image)
    pipe.load_lora_weights(path, adapter_name="style")
    _differ(_moe_edit(pipe, source_image), moe)
    pipe.set_adapters(["default", "style"], [1.0, 0.0])
    np.testing.assert_allclose(_moe_edit(pipe, source_image), moe, atol=1e-6)
    pipe.delete_adapters("style")
    assert pipe.get_list_adapters() == {"transformer": ["default"]}


# -- beyond plain pairs: what else stock loads ------------------------------------------------------
# Modules a PEFT-trained test file targets ("proj_out" matches the single block's and the final one).
PEFT_TARGETS = ["to_q", "to_v", "ff.net.0.proj", "proj_out", "x_embedder"]


def _peft_trained_file(directory, with_metadata=True, **config):
    """(path, state) of a LoRA as PEFT trains it on the tiny transformer and diffusers saves it (keys from
    get_peft_model_state_dict: lora_A/lora_B, plus lora_magnitude_vector (N,) with use_dora or lora_B.bias
    (N,) with lora_bias), r = 4, lora_alpha = 8; magnitudes and biases moved off their initial values."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = tiny_flux_transformer(0)
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS, init_lora_weights=False, **config)
    model.add_adapter(lora_config)
    g = _gen(5)
    state = {k: (v + 0.3 * torch.randn(v.shape, generator=g) if "magnitude" in k or k.endswith(".bias") else v)
             for k, v in get_peft_model_state_dict(model).items()}
    if with_metadata:
        metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in lora_config.to_dict().items()}
        return _save_peft(directory, state, metadata), state
    save_file({f"transformer.{k}": v.contiguous() for k, v in state.items()}, str(directory / "lora.safetensors"))
    return directory / "lora.safetensors", state


def _lora_methods_match_stock(ours, stock, image, base):
    """A call's scale, a set_adapters weight, fuse_lora / unfuse_lora and unloading, side by side."""
    full = _same(ours, stock, image)
    _differ(full, base)
    _differ(_same(ours, stock, image, joint_attention_kwargs={"scale": 0.5}), full)
    for p in (ours, stock):
        p.set_adapters("style", 0.7)
    _same(ours, stock, image)
    for p in (ours, stock):
        p.fuse_lora(lora_scale=0.5)
    _same(ours, stock, image)
    for p in (ours, stock):
        p.unfuse_lora()
        p.set_adapters("style", 1.0)
    np.testing.assert_allclose(_same(ours, stock, image), full, atol=ATOL)
    for p in (ours, stock):
        p.unload_lora_weights()
    np.testing.assert_allclose(_same(ours, stock, image), base, atol=ATOL)
    return full


@pytest.mark.parametrize("with_metadata", [True, False], ids=["metadata", "no_metadata"])
def test_peft_dora_file_matches_stock(with_metadata, tmp_path, source_image):
    """PEFT's DoRA (use_dora: lora_magnitude_vector keys): each module's weight becomes
    m / ||W + s B A||_row * (W + s B A), at every strength, fused or not, as stock."""
    path, state = _peft_trained_file(tmp_path, with_metadata, use_dora=True)
    ours, stock, base = _loaded(path, source_image)
    m = "transformer_blocks.0.attn.to_q"
    W = ours.transformer.get_submodule(m).base_layer.weight
    scale = 2.0 if with_metadata else 1.0  # lora_alpha / r; without metadata or alphas stock takes alpha = r
    update = W + scale * state[f"{m}.lora_B.weight"] @ state[f"{m}.lora_A.weight"]
    magnitude = state[f"{m}.lora_magnitude_vector"]
    torch.testing.assert_close(W + _delta(ours, m, "style"), magnitude[:, None] * update / update.norm(dim=1, keepdim=True))
    full = _lora_methods_match_stock(ours, stock, source_image, base)
    plain, _ = _pipes()  # the magnitudes matter: without them the file is another LoRA
    plain.load_lora_weights({f"transformer.{k}": v for k, v in state.items() if "magnitude" not in k})
    _differ(_edit(plain, source_image), full)


@pytest.mark.parametrize("with_metadata", [True, False], ids=["metadata", "no_metadata"])
def test_peft_lora_bias_file_matches_stock(with_metadata, tmp_path, source_image):
    """PEFT's lora_bias (lora_B.bias keys): the update is s * (B A x + b), the bias scaled with the rest and
    merged into the layer's bias by fuse_lora, as stock."""
    path, state = _peft_trained_file(tmp_path, with_metadata, lora_bias=True)
    ours, stock, base = _loaded(path, source_image)
    m = "transformer_blocks.0.attn.to_q"
    torch.testing.assert_close(ours.transformer.get_submodule(m).adapters["style"].lora_bias, state[f"{m}.lora_B.bias"])
    full = _lora_methods_match_stock(ours, stock, source_image, base)
    plain, _ = _pipes()
    plain.load_lora_weights({f"transformer.{k}": v for k, v in state.items() if not k.endswith(".bias")})
    _differ(_edit(plain, source_image), full)


def test_kohya_final_layer_alpha_is_applied_at_alpha_over_rank(tmp_path, source_image, caplog):
    """diffusers' kohya converter drops a final_layer alpha and stock then drops the final_layer keys
    themselves (unprefixed). x2edit applies them (see above), at alpha / r as sd-scripts does, and warns:
    its edit is stock's with the final layer given to stock at that strength as a second LoRA."""
    modules = {**KOHYA, "final_layer.linear": (32, 16, 4, 8.0, ["proj_out"])}
    state = _kohya_state(modules)
    save_file(state, str(tmp_path / "lora.safetensors"))
    ours, stock = _pipes()
    base = _edit(stock, source_image)
    with caplog.at_level("WARNING", logger="x2edit.adapters.community"):
        ours.load_lora_weights(tmp_path / "lora.safetensors", adapter_name="style")
    assert "applies this final_layer LoRA (proj_out) at alpha / r = 2" in caplog.text
    _check_kohya_deltas(ours, state, modules)
    stock.load_lora_weights(tmp_path / "lora.safetensors", adapter_name="style")
    up, down = state["lora_unet_final_layer_linear.lora_up.weight"], state["lora_unet_final_layer_linear.lora_down.weight"]
    stock.load_lora_weights({"transformer.proj_out.lora_A.weight": down, "transformer.proj_out.lora_B.weight": 2.0 * up},
                            adapter_name="final")
    stock.set_adapters(["style", "final"])
    _differ(_same(ours, stock, source_image), base)


def test_kohya_fp16_file_matches_stock(tmp_path, source_image):
    """sd-scripts' --save_precision fp16: every tensor, the alphas too (0-d), in float16."""
    state = {k: v.half() for k, v in _kohya_state(KOHYA).items()}
    save_file(state, str(tmp_path / "lora.safetensors"))
    ours, stock, base = _loaded(tmp_path / "lora.safetensors", source_image)
    _differ(_same(ours, stock, source_image), base)


def test_kohya_text_encoder_keys_are_skipped_and_the_transformer_part_matches_stock(tmp_path, source_image, caplog):
    """lora_te1_ keys beside lora_unet_ ones: stock puts them on CLIP, x2edit (transformer only) skips them with
    a warning; its edit is stock's with the transformer part of the file."""
    te = {}
    for i, (name, (k, n)) in enumerate({"lora_te1_text_model_encoder_layers_0_mlp_fc1": (32, 37),
                                        "lora_te1_text_model_encoder_layers_0_mlp_fc2": (37, 32)}.items()):
        te.update({f"{name}.lora_down.weight": _rand(2, k, seed=60 + i), f"{name}.lora_up.weight": _rand(n, 2, seed=70 + i),
                   f"{name}.alpha": torch.tensor(1.0)})
    unet = _kohya_state(KOHYA)
    save_file({**unet, **te}, str(tmp_path / "lora.safetensors"))
    ours, stock = _pipes()
    base = _edit(stock, source_image)
    with caplog.at_level("WARNING", logger="x2edit.adapters.community"):
        ours.load_lora_weights(tmp_path / "lora.safetensors", adapter_name="style")
    assert "ignoring 4 text-encoder LoRA keys" in caplog.text
    stock.load_lora_weights(unet, adapter_name="style")
    _differ(_same(ours, stock, source_image), base)


def test_comfyui_lora_A_keys_load_nothing_as_stock(tmp_path, source_image, caplog):
    """diffusion_model.* keys in lora_A/lora_B form: diffusers converts BFL names only in kohya's
    lora_down/lora_up form, and its loader drops the unconverted, unprefixed keys; stock loads nothing and
    edits as the base. So does x2edit, and says so."""
    state = {}
    for i, (name, (k, n, r, _, _)) in enumerate(KOHYA.items()):
        state[f"diffusion_model.{name}.lora_A.weight"] = _rand(r, k, seed=80 + i)
        state[f"diffusion_model.{name}.lora_B.weight"] = _rand(n, r, seed=90 + i)
    save_file(state, str(tmp_path / "lora.safetensors"))
    ours, stock = _pipes()
    base = _edit(stock, source_image)
    with caplog.at_level("WARNING", logger="x2edit.adapters.community"):
        ours.load_lora_weights(tmp_path / "lora.safetensors", adapter_name="style")
    stock.load_lora_weights(tmp_path / "lora.safetensors", adapter_name="style")
    assert "as stock diffusers drops every unprefixed key" in caplog.text and "loads nothing" in caplog.text
    assert ours.get_list_adapters() == stock.get_list_adapters() == {}
    np.testing.assert_allclose(_same(ours, stock, source_image), base, atol=ATOL)


def test_kohya_dora_scale_is_dropped_as_stock(tmp_path, source_image, caplog):
    """kohya/LyCORIS DoRA magnitudes (dora_scale): stock's lora_state_dict drops them with a warning and loads
    the rest as a plain LoRA; x2edit does the same and says what that costs."""
    state = {**_kohya_state(KOHYA), "lora_unet_double_blocks_0_img_attn_proj.dora_scale": torch.rand(1, 32) + 0.5}
    save_file(state, str(tmp_path / "lora.safetensors"))
    ours, stock = _pipes()
    base = _edit(stock, source_image)
    with caplog.at_level("WARNING", logger="x2edit.adapters.community"):
        ours.load_lora_weights(tmp_path / "lora.safetensors", adapter_name="style")
    assert "ignoring 1 kohya DoRA magnitudes (dora_scale)" in caplog.text
    stock.load_lora_weights(tmp_path / "lora.safetensors", adapter_name="style")
    _check_kohya_deltas(ours, state, KOHYA)
    _differ(_same(ours, stock, source_image), base)


CONTROL_NORMS = ["transformer_blocks.0.attn.norm_q", "transformer_blocks.0.attn.norm_k",
                 "transformer_blocks.0.attn.norm_added_q", "transformer_blocks.0.attn.norm_added_k",
                 "single_transformer_blocks.0.attn.norm_q", "single_transformer_blocks.0.attn.norm_k"]


def test_control_lora_loads_its_norms_and_reads_no_control_image(tmp_path, source_image, caplog):
    """A FLUX.1 Control LoRA (Canny/Depth) as diffusers converts BFL's file: an x_embedder LoRA reading twice
    the model's input channels (latents | control latents) and full RMSNorm scales beside the LoRA pairs.
    Stock widens x_embedder (zero columns), doubles in_channels and writes the norms; its Kontext pipeline then
    fails on every call. x2edit writes the norms too and keeps the model, running exactly as stock's
    transformer does with all-zero control latents; unloading gives the norms back, as stock."""
    state = {"transformer.x_embedder.lora_A.weight": _rand(4, 32, seed=1),  # (r, 2 * 16)
             "transformer.x_embedder.lora_B.weight": _rand(32, 4, seed=2),
             "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": _rand(4, 32, seed=3),
             "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": _rand(32, 4, seed=4)}
    state.update({f"transformer.{n}.weight": 1 + _rand(16, seed=10 + i) for i, n in enumerate(CONTROL_NORMS)})
    save_file(state, str(tmp_path / "control.safetensors"))
    ours, stock = _pipes()
    base = _edit(ours, source_image)
    originals = {n: ours.transformer.get_parameter(f"{n}.weight").clone() for n in CONTROL_NORMS}
    with caplog.at_level("WARNING", logger="x2edit.adapters.community"):
        for p in (ours, stock):
            p.load_lora_weights(tmp_path / "control.safetensors", adapter_name="control")
    assert "FLUX.1 Control LoRA" in caplog.text
    for n in CONTROL_NORMS:
        for p in (ours, stock):
            torch.testing.assert_close(p.transformer.get_parameter(f"{n}.weight"), state[f"transformer.{n}.weight"])
    inputs = tiny_flux_inputs(batch=1)
    with torch.no_grad():
        stock_out = stock.transformer(**{**inputs, "hidden_states": torch.cat(
            [inputs["hidden_states"], torch.zeros_like(inputs["hidden_states"])], dim=-1)})[0]
        torch.testing.assert_close(ours.transformer(**inputs)[0], stock_out, rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError):  # stock's Kontext pipeline makes latents of in_channels / 4 = 8 channels
        _edit(stock, source_image)
    _differ(_edit(ours, source_image), base)
    ours.unload_lora_weights()
    for n in CONTROL_NORMS:
        assert torch.equal(ours.transformer.get_parameter(f"{n}.weight"), originals[n])
    np.testing.assert_allclose(_edit(ours, source_image), base, atol=1e-6)


def test_a_narrower_x_embedder_lora_is_zero_padded_as_stock():
    """A FLUX.1 LoRA's x_embedder (16 inputs) on a model with a wider input (Fill: 48): stock zero-pads lora_A
    (``_maybe_expand_lora_state_dict``), so the LoRA reads the noisy latents only; x2edit does the same."""
    from diffusers import FluxFillPipeline

    from x2edit.adapters import load_community_lora
    from x2edit.testing import tiny_fill_components

    state = {"transformer.x_embedder.lora_A.weight": _rand(4, 16, seed=1),
             "transformer.x_embedder.lora_B.weight": _rand(32, 4, seed=2)}
    stock = FluxFillPipeline(**tiny_fill_components(0))
    stock.load_lora_weights(dict(state), adapter_name="style")
    ours = tiny_fill_components(0)["transformer"]
    load_community_lora(ours, dict(state), "style")
    inputs = tiny_flux_inputs(batch=1)
    inputs["hidden_states"] = torch.randn(1, 16, 48, generator=_gen(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs)[0], stock.transformer(**inputs)[0], rtol=0, atol=1e-5)
        assert (ours(**inputs)[0] - tiny_fill_components(0)["transformer"](**inputs)[0]).abs().max() > 1e-2


# -- refusals ---------------------------------------------------------------------------------------
def _peft_pair(module="transformer.transformer_blocks.0.attn.to_q", k=32, n=32, r=2, value=0.0):
    return {f"{module}.lora_A.weight": torch.full((r, k), value), f"{module}.lora_B.weight": torch.zeros(n, r)}


def test_bad_files_are_refused_whole(tmp_path):
    ours, _ = _pipes()
    with pytest.raises(FileNotFoundError):
        ours.load_lora_weights(tmp_path / "absent.safetensors")
    kohya = _kohya_state(KOHYA)
    te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    q = "transformer.transformer_blocks.0.attn.to_q"
    cases = {
        "other_base": (_peft_pair(k=64), "do not fit"),
        "no_module": (_peft_pair("transformer.transformer_blocks.7.attn.to_q"), "does not have"),
        "nan": (_peft_pair(value=float("nan")), "non-finite"),
        "half": ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32)},
                 "both lora_A and lora_B"),
        "text_encoder_only": ({f"{te}.lora_down.weight": torch.zeros(2, 32), f"{te}.lora_up.weight": torch.zeros(32, 2)},
                              "holds no transformer LoRA weights"),
        "kohya_and_diffusers": ({**kohya, **_peft_pair()}, "mixes key layouts"),
        "kohya_and_xlabs": ({**kohya, **_xlabs_state()}, "mixes key layouts"),
        "kohya_without_up": ({k: v for k, v in kohya.items() if "img_attn_proj.lora_up" not in k},
                             "converter could not read"),
        "metadata_and_alphas": ({**_peft_pair(), "transformer.transformer_blocks.0.attn.to_q.alpha": torch.tensor(2.)},
                                "both PEFT metadata and .alpha"),
        # PEFT's LoraConfig refuses use_dora with lora_bias; stock refuses the file.
        "dora_and_bias": ({**_peft_pair(), f"{q}.lora_magnitude_vector": torch.ones(32), f"{q}.lora_B.bias": torch.ones(32)},
                          "PEFT refuses"),
        # Metadata without use_dora: stock builds plain layers and then fails loading the magnitudes.
        "magnitudes_without_use_dora": ({**_peft_pair(), f"{q}.lora_magnitude_vector": torch.ones(32)},
                                        "does not set use_dora"),
        "nan_magnitude": ({**_peft_pair(), f"{q}.lora_magnitude_vector": torch.full((32,), float("nan"))}, "non-finite"),
        "bad_magnitude": ({**_peft_pair(), f"{q}.lora_magnitude_vector": torch.ones(31)}, "does not match B"),
        "control_norm_of_another_model": ({**_peft_pair(), "transformer.transformer_blocks.0.attn.norm_q.weight":
                                           torch.ones(128)}, "has shape"),
    }
    for name, (state, message) in cases.items():
        if name in ("metadata_and_alphas", "magnitudes_without_use_dora"):
            path = _save_peft(tmp_path / name, {k.removeprefix("transformer."): v for k, v in state.items()},
                              {"r": 2, "lora_alpha": 2})
        else:
            path = tmp_path / f"{name}.safetensors"
            save_file(state, str(path))
        with pytest.raises(ValueError, match=message) as e:
            ours.load_lora_weights(path)
        assert "\n" not in str(e.value), name
        assert adapter_names(ours.transformer) == [] and not list(adapter_layers(ours.transformer)), name
    # Metadata that does not describe the weights.
    path = _save_peft(tmp_path / "wrong_rank", _peft_state(), {"r": 8, "lora_alpha": 8})
    with pytest.raises(ValueError, match="metadata gives .* rank 8, but its weights have rank 4"):
        ours.load_lora_weights(path)
    assert not list(adapter_layers(ours.transformer))


def test_management_refusals(lora_file):
    ours, _ = _pipes()
    with pytest.raises(ValueError, match="hotswap"):
        ours.load_lora_weights(lora_file, hotswap=True)
    with pytest.raises(ValueError, match="unexpected arguments"):
        ours.load_lora_weights(lora_file, wieght_name="x.safetensors")
    with pytest.raises(ValueError, match="invalid adapter name"):
        ours.load_lora_weights(lora_file, adapter_name="a.b")
    assert not list(adapter_layers(ours.transformer))
    ours.load_lora_weights(lora_file, adapter_name="style")
    elsewhere = _peft_pair("transformer.transformer_blocks.0.ff_context.net.2", k=128)  # a module "style" lacks
    with pytest.raises(ValueError, match="already loaded"):
        ours.load_lora_weights(elsewhere, adapter_name="style")
    assert isinstance(ours.transformer.transformer_blocks[0].ff_context.net[2], nn.Linear)
    with pytest.raises(ValueError, match="dicts"):
        ours.set_adapters("style", [{"transformer": 0.5}])
    with pytest.raises(ValueError, match="components"):
        ours.fuse_lora(components=["unet"])
    with pytest.raises(ValueError, match="unknown adapters"):
        ours.delete_adapters(["style", "absent"])
    assert ours.get_list_adapters() == {"transformer": ["style"]}  # nothing deleted
    ours.fuse_lora()
    with pytest.raises(ValueError, match="fused"):
        ours.set_adapters("style", 0.5)
    with pytest.raises(ValueError, match="fused"):
        ours.delete_adapters("style")
    ours.unfuse_lora()
    ours.disable_lora()
    with pytest.raises(ValueError, match="enable_lora"):
        ours.fuse_lora()
    with pytest.raises(ValueError, match="finite number"):
        with ours._community_lora_scale({"scale": float("nan")}):
            pass
