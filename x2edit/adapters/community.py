"""Community LoRAs (kohya, ComfyUI, XLabs, diffusers/PEFT files) beside the x2edit adapters.

Reading. diffusers' Flux converters (``FluxKontextPipeline.lora_state_dict``) turn every layout into
diffusers/PEFT keys; nothing here re-writes them. ``read_community_lora`` is the one reader: it gives
{module: (A, B, scale)} without a model, ``load_community_lora`` loads what it returns, and
``retrieval`` (the weight encoder, the LoRA index) reads files only through it and
``read_lora_header``. The strength of each module is the one stock gives
it: PEFT's ``LoraConfig`` (built from the file's metadata, or by diffusers' ``get_peft_kwargs`` from
the ranks and ``.alpha`` tensors), resolved per module with PEFT's ``get_pattern_key``:

    delta W = s * B A,   s = alpha / r   (alpha / sqrt(r) with use_rslora)

kohya and ComfyUI alphas are already folded into A and B by the converter, XLabs files have none.

Placement. Each LoRA becomes a plain ``LoRA`` adapter of the ``AdapterLinear`` layers it targets,
marked ``config.extra["source"] == "community"``, so it runs in the same fused kernel call as the
MoE-LoRA. The functions below (fuse, unfuse, unload, per-call scale) act on those marked adapters
only, as stock's LoRA methods act on what its ``load_lora_weights`` loaded; the x2edit editing
adapter is part of the model and is left alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import traceback
from collections import defaultdict
from collections.abc import Iterator

import torch
import torch.nn as nn

from x2edit.adapters.config import AdapterConfig
from x2edit.adapters.inject import _set_submodule, adapter_layers, adapter_names
from x2edit.adapters.layers import AdapterLinear, LoRA, check_adapter_name

logger = logging.getLogger(__name__)

COMMUNITY = "community"  # AdapterConfig.extra["source"] of the LoRAs loaded here

# Key prefixes of text-encoder LoRA weights (kohya, ComfyUI, diffusers): x2edit does not load them.
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.")
# What lora_state_dict reads a file with; anything else is refused rather than ignored.
_READ_KWARGS = ("weight_name", "subfolder", "use_safetensors", "local_files_only", "cache_dir", "force_download",
                "proxies", "token", "revision")


def is_community(adapter: nn.Module) -> bool:
    """True for an adapter loaded by ``load_community_lora``."""
    return adapter.config.extra.get("source") == COMMUNITY


def community_loras(model: nn.Module) -> list[str]:
    """Names of the community LoRAs in ``model``, in load order."""
    names: dict[str, None] = {}
    for _, layer in adapter_layers(model):
        names.update((n, None) for n, a in layer.adapters.items() if is_community(a))
    return list(names)


def _layout(key: str) -> str | None:
    """The converter family a raw key belongs to (None: a text-encoder key, ignored)."""
    if key.startswith(_TEXT_ENCODER_PREFIXES):
        return None
    if ".processor." in key:
        return "XLabs"
    if key.startswith(("lora_unet_", "lora_transformer_", "diffusion_model.")):
        return "kohya/ComfyUI"
    return "diffusers/PEFT"


def _read(source, kwargs: dict) -> tuple[dict, dict | None]:
    """(raw state dict, diffusers LoRA metadata or None) of a file, directory or dict, read as stock reads it."""
    # diffusers' private reader: the one stock's lora_state_dict uses (directories, weight_name,
    # .bin fallback, metadata header). We need the raw keys before conversion to refuse mixed files.
    from diffusers.loaders.lora_base import _fetch_state_dict

    unknown = sorted(set(kwargs) - set(_READ_KWARGS))
    if unknown:
        raise ValueError(f"unexpected arguments {unknown} for loading a LoRA (accepted: {list(_READ_KWARGS)})")
    if isinstance(source, dict):
        return dict(source), None
    if not os.path.exists(source):
        raise FileNotFoundError(f"LoRA file not found: {source}")
    use_safetensors = kwargs.get("use_safetensors")
    try:
        return _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=source, weight_name=kwargs.get("weight_name"),
            use_safetensors=True if use_safetensors is None else use_safetensors,
            allow_pickle=use_safetensors is None, local_files_only=kwargs.get("local_files_only"),
            cache_dir=kwargs.get("cache_dir"), force_download=kwargs.get("force_download", False),
            proxies=kwargs.get("proxies"), token=kwargs.get("token"), revision=kwargs.get("revision"),
            subfolder=kwargs.get("subfolder"), user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"})
    except Exception as e:
        raise ValueError(f"cannot read LoRA {source}: {_one_line(e)}") from e


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    if text:
        return f"{type(e).__name__}: {text[0]}"
    frame = traceback.extract_tb(e.__traceback__)[-1]
    return f"{type(e).__name__} in {frame.name} ({os.path.basename(frame.filename)}:{frame.lineno})"


def _convert(raw: dict) -> tuple[dict, dict | None]:
    """(diffusers/PEFT state dict, {key: alpha} or None) by diffusers' Flux converters.

    Refuses first what the converters would drop or misread: mixed layouts, DoRA magnitudes, kohya
    final_layer alphas.
    """
    from diffusers import FluxKontextPipeline

    layouts: dict[str, str] = {}
    for key in raw:
        layouts.setdefault(_layout(key), key)
    layouts.pop(None, None)
    if len(layouts) > 1:
        (a, ka), (b, kb) = list(layouts.items())[:2]
        raise ValueError(f"the LoRA file mixes key layouts ({a}, e.g. {ka!r}, and {b}, e.g. {kb!r}); diffusers would "
                         "load only part of it")
    if any("dora_scale" in k or "lora_magnitude_vector" in k for k in raw):
        raise ValueError("the LoRA file is a DoRA (it has magnitude vectors); x2edit loads plain LoRAs only")
    for key, alpha in raw.items():
        if "final_layer" not in key or not key.endswith(".alpha"):
            continue
        down = raw.get(key.removesuffix(".alpha") + ".lora_down.weight")
        if down is not None and float(alpha) != down.shape[0]:
            # diffusers' kohya converter drops these alphas (a TODO there): the layer would run at r / alpha.
            raise ValueError(f"{key} = {float(alpha):g} differs from the rank {down.shape[0]}, and diffusers' kohya "
                             "converter ignores the alpha of final_layer LoRAs (it would run at the wrong strength)")
    try:
        # lora_state_dict's converters pop from the dict they get: hand them a copy.
        return FluxKontextPipeline.lora_state_dict(dict(raw), return_alphas=True)
    except Exception as e:
        if isinstance(e, AssertionError) and any("single_blocks" in k and "linear1" in k for k in raw):
            raise ValueError("kohya single-block linear1 LoRAs are split by diffusers at FLUX.1's sizes "
                             "(3 x 3072 + 12288 outputs), so they load only into FLUX.1-size transformers") from e
        raise ValueError(f"diffusers' Flux LoRA converter could not read this file ({_one_line(e)})") from e


def _scalings(pairs: dict, alphas: dict | None, metadata: dict | None) -> dict[str, float]:
    """alpha / r for each module (alpha / sqrt(r) with use_rslora), from the LoraConfig stock builds."""
    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    if metadata:
        try:
            config = LoraConfig(**metadata)
        except (TypeError, ValueError) as e:
            raise ValueError(f"the LoRA file's PEFT metadata is not a LoraConfig ({_one_line(e)})") from None
    else:
        # Keys as diffusers' load_lora_adapter builds them; the alphas are lora_state_dict's own tensors,
        # so a module without one gets the same default alpha as in stock.
        ranks = {f"^{m}.lora_B.weight": ab["B"].shape[1] for m, ab in pairs.items()}
        state = {f"{m}.lora_A.weight": ab["A"] for m, ab in pairs.items()}
        config = LoraConfig(**get_peft_kwargs(ranks, alphas, state))
    if config.use_dora:
        raise ValueError("the LoRA file's metadata says use_dora; x2edit loads plain LoRAs only")
    scalings = {}
    for module, ab in pairs.items():
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        if r != ab["A"].shape[0]:
            raise ValueError(f"the LoRA file's metadata gives {module} rank {r}, but its weights have rank "
                             f"{ab['A'].shape[0]}")
        scalings[module] = float(alpha) / (math.sqrt(r) if config.use_rslora else r)
    return scalings


def _strip(prefix: str, mapping: dict | None) -> dict | None:
    """Keys of ``mapping`` without ``prefix.``; keys of another component (text_encoder.) are dropped."""
    if not mapping:
        return None
    out = {}
    for k, v in mapping.items():
        if k.startswith(prefix + "."):
            out[k[len(prefix) + 1:]] = v
        elif not k.startswith(_TEXT_ENCODER_PREFIXES):
            out[k] = v  # diffusers' kohya converter writes a few transformer keys without the prefix
    return out or None


def read_community_lora(source: str | os.PathLike | dict, prefix: str = "transformer",
                        **kwargs) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Read a Flux LoRA file (any layout diffusers converts) into per-module factors, without a model.

    The one reader of community LoRA files: ``load_community_lora`` loads what it returns, and
    ``retrieval`` (the weight encoder, the index) reads files only through it.

    Args:
        source: a .safetensors file, a directory (with ``weight_name=`` in kwargs), or a state dict.
        prefix: the component prefix of keys in the file (diffusers writes ``transformer.``).
        **kwargs: how to find the file (weight_name, subfolder, ...), as ``lora_state_dict`` takes them.
    Returns {diffusers module name: (A (r, K), B (N, r), scale)}, sorted by module name; the module's
    update is ``scale * B @ A`` (scale = alpha / r as stock resolves it). Raises ``ValueError`` with
    one line naming the problem for files that are not plain transformer LoRAs.
    """
    raw, metadata = _read(source, kwargs)
    state, alphas = _convert(raw)
    metadata, alphas = _strip(prefix, metadata), _strip(prefix, alphas)
    if metadata and alphas:
        raise ValueError("the LoRA file has both PEFT metadata and .alpha tensors (stock diffusers refuses it too)")

    pairs: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in (_strip(prefix, state) or {}).items():
        if key.endswith(".lora_A.weight"):
            pairs[key[: -len(".lora_A.weight")]]["A"] = value
        elif key.endswith(".lora_B.weight"):
            pairs[key[: -len(".lora_B.weight")]]["B"] = value
        else:
            raise ValueError(f"unsupported LoRA key {key!r} (only lora_A/lora_B pairs on linears are supported; "
                             "DoRA magnitudes and LoRA biases are not)")
    skipped = [k for k in state if k.startswith(_TEXT_ENCODER_PREFIXES)]
    if skipped:
        logger.warning("ignoring %d text-encoder LoRA keys (x2edit applies community LoRAs to the transformer)",
                       len(skipped))
    if not pairs:
        raise ValueError("the LoRA file holds no transformer LoRA weights")
    for module_name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA for {module_name} has only {sorted(ab)}; both lora_A and lora_B are needed")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"LoRA for {module_name}: A {tuple(A.shape)} and B {tuple(B.shape)} are not the factors "
                             "of one low-rank update")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(f"LoRA for {module_name} holds non-finite values (NaN/inf)")
    scalings = _scalings(pairs, alphas, metadata)
    return {m: (pairs[m]["A"], pairs[m]["B"], scalings[m]) for m in sorted(pairs)}


def read_lora_header(path: str | os.PathLike) -> tuple[str, dict[str, str]]:
    """(key layout, header metadata) of a LoRA .safetensors file, from its header only (no weights read).

    The layout is the converter family of its keys ("kohya/ComfyUI", "XLabs", "diffusers/PEFT"; "mixed"
    for several); the metadata is the header's strings (kohya ``ss_*`` fields, ``modelspec.*``,
    diffusers' ``lora_adapter_metadata``). Other files give ("unknown", {}). A .safetensors file with no
    LoRA key (full model weights, say) is refused here, before any tensor is read.
    """
    from safetensors import safe_open

    if not str(path).endswith(".safetensors"):
        return "unknown", {}
    try:
        with safe_open(str(path), framework="pt") as f:
            keys, metadata = list(f.keys()), dict(f.metadata() or {})
    except Exception as e:
        raise ValueError(f"cannot read the header of {path}: {_one_line(e)}") from e
    if keys and not any("lora" in k.lower() for k in keys):  # every LoRA layout names its factors "lora"
        raise ValueError(f"not a LoRA: none of its {len(keys)} keys is a LoRA key (e.g. {keys[0]!r})")
    layouts = {_layout(k) for k in keys} - {None}
    return (layouts.pop() if len(layouts) == 1 else "mixed" if layouts else "unknown"), metadata


def load_community_lora(model: nn.Module, source: str | os.PathLike | dict, adapter_name: str,
                        prefix: str = "transformer", **kwargs) -> list[str]:
    """Load a Flux LoRA file (any layout diffusers converts) into ``model`` as adapter ``adapter_name``.

    Args:
        model: the transformer (with or without adapters already).
        source: a .safetensors file, a directory (with ``weight_name=`` in kwargs), or a state dict.
        adapter_name: name of the new adapter.
        prefix: the component prefix of keys in the file (diffusers writes ``transformer.``).
        **kwargs: how to find the file, as ``lora_state_dict`` takes them (weight_name, subfolder, ...).
    Returns the adapted module names. On error the model is left unchanged.
    """
    check_adapter_name(adapter_name)
    if adapter_name in adapter_names(model):
        raise ValueError(f"an adapter named {adapter_name!r} is already loaded; pick another adapter_name")
    factors = read_community_lora(source, prefix, **kwargs)

    # Validate everything before touching the model.
    plan = []
    for module_name, (A, B, scaling) in factors.items():
        try:
            target = model.get_submodule(module_name)
        except AttributeError:
            hint = (" (diffusers converts keys named after the original FLUX modules only in kohya's "
                    "lora_down/lora_up form)") if module_name.startswith("diffusion_model.") else ""
            raise ValueError(f"LoRA targets {module_name!r}, which this model does not have; is the LoRA for "
                             f"another base model?{hint}") from None
        if not isinstance(target, (nn.Linear, AdapterLinear)):
            raise ValueError(f"LoRA targets {module_name!r}, a {type(target).__name__}, not a linear layer")
        if A.shape[1] != target.in_features or B.shape[0] != target.out_features:
            raise ValueError(f"LoRA for {module_name}: A {tuple(A.shape)} and B {tuple(B.shape)} do not fit a linear "
                             f"{target.in_features}->{target.out_features}; is the LoRA for another base model?")
        plan.append((module_name, target, A, B, scaling))

    for module_name, target, A, B, scaling in plan:
        if isinstance(target, nn.Linear):
            target = AdapterLinear(target)
            _set_submodule(model, module_name, target)
        rank = A.shape[0]
        lora = LoRA(target.in_features, target.out_features, rank, scaling,
                    AdapterConfig(kind="lora", rank=rank, alpha=scaling * rank, targets=[module_name],
                                  extra={"source": COMMUNITY}))
        with torch.no_grad():
            lora.lora_A.copy_(A[None])
            lora.lora_B.copy_(B[None])
        lora.requires_grad_(False)
        target.add_adapter(adapter_name, lora)
    return [p[0] for p in plan]


def _community_layers(model: nn.Module, names: list[str] | None = None) -> Iterator[tuple[str, AdapterLinear, str]]:
    """(module name, layer, adapter name) for each community LoRA (of ``names``, if given) in each layer."""
    for module_name, layer in list(adapter_layers(model)):
        for n, adapter in list(layer.adapters.items()):
            if is_community(adapter) and (names is None or n in names):
                yield module_name, layer, n


def _check_scale(scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"the LoRA scale must be a finite number, got {scale!r}")


def fused_community_loras(model: nn.Module) -> list[str]:
    """Names of the community LoRAs folded into the base weights (``fuse_community_loras``)."""
    return list(dict.fromkeys(n for _, layer, n in _community_layers(model) if n in layer.merged))


def fuse_community_loras(model: nn.Module, names: list[str], scale: float = 1.0) -> None:
    """Fold community LoRAs ``names`` into the base weights at ``scale`` times their weight.

    As stock (PEFT's ``scale_layer`` before ``merge``), the LoRAs' weights stay multiplied by ``scale``:
    after ``unfuse_community_loras`` they run unfused at that strength until ``set_adapters`` resets
    them. Already fused LoRAs are skipped. Every layer is checked finite before any is written.
    """
    _check_scale(scale)
    todo = [(layer, n) for _, layer, n in _community_layers(model, names) if n not in layer.merged]
    saved = [(layer, n, layer.adapter_weights[n]) for layer, n in todo]
    try:
        for layer, n in todo:
            layer.adapter_weights[n] *= scale
        for layer, n in todo:
            layer.merged_weight(n)  # raises on non-finite weights, before any layer is written
    except Exception:
        for layer, n, w in saved:
            layer.adapter_weights[n] = w
        raise
    for layer, n in todo:
        layer.merge(n)


def unfuse_community_loras(model: nn.Module) -> None:
    """Take every fused community LoRA out of the base weights again (it keeps running unfused)."""
    for _, layer, n in _community_layers(model):
        if n in layer.merged:
            layer.unmerge(n)


def unload_community_loras(model: nn.Module) -> list[str]:
    """Remove every community LoRA; a fused one stays in the base weights, as stock. Returns the names."""
    names = community_loras(model)
    for module_name, layer, n in _community_layers(model):
        # A fused LoRA's update is already in base_layer.weight: forget the merge record, keep the weight
        # (stock's fuse_lora + unload_lora_weights bakes a LoRA into the model this way).
        layer.delete_adapter(n, keep_merged=True)
        if not layer.adapters:
            _set_submodule(model, module_name, layer.base_layer)
    return names


def community_weights(model: nn.Module) -> dict[str, float]:
    """{name: set_adapters weight} of each community LoRA (the same in every layer it targets)."""
    return {n: layer.adapter_weights[n] for _, layer, n in _community_layers(model)}


def set_community_weights(model: nn.Module, weights: dict[str, float]) -> None:
    """Write the set_adapters weight of community LoRAs ``weights`` (name -> weight) in every layer."""
    for _, layer, n in _community_layers(model, list(weights)):
        layer.adapter_weights[n] = float(weights[n])


@contextlib.contextmanager
def community_lora_scale(model: nn.Module, scale: float = 1.0) -> Iterator[None]:
    """Multiply the active, unfused community LoRAs by ``scale`` inside the block (stock's
    ``joint_attention_kwargs={"scale": s}``; a fused LoRA is in the base weights and keeps its strength)."""
    _check_scale(scale)
    saved = [(layer, n, layer.adapter_weights[n]) for _, layer, n in _community_layers(model)
             if n in layer.active_adapters and n not in layer.merged] if scale != 1.0 else []
    for layer, n, w in saved:
        layer.adapter_weights[n] = w * scale
    try:
        yield
    finally:
        for layer, n, w in saved:
            layer.adapter_weights[n] = w
