"""The LoRA and adapter methods of ``X2EditPipeline``: diffusers' names, acting on x2edit's adapter layers.

Stock ``FluxKontextPipeline`` implements these on PEFT layers, which x2edit's ``AdapterLinear`` is
not, so without this mixin they would silently do nothing. The rule:

- the *LoRA* methods (``load_lora_weights``, ``unload_lora_weights``, ``fuse_lora`` / ``unfuse_lora``,
  ``disable_lora`` / ``enable_lora``, and ``joint_attention_kwargs={"scale": s}`` of a call) act on
  the community LoRAs loaded with ``load_lora_weights``, exactly as stock acts on what its
  ``load_lora_weights`` loaded;
- the x2edit editing adapter (``load_adapter``, ``from_pretrained``, ``inject_adapters``) is part of
  the model: the LoRA methods leave it alone. The *adapter* methods (``set_adapters``,
  ``get_list_adapters``, ``get_active_adapters``, ``delete_adapters``) see every adapter, both kinds.

Where stock's behaviour is surprising we keep it, so a script behaves the same on either pipeline:
``fuse_lora(lora_scale=s)`` leaves the LoRAs multiplied by s after ``unfuse_lora``, and
``fuse_lora`` followed by ``unload_lora_weights`` keeps the fused update in the base weights.

Beyond stock (AutoLoRA): ``fuse_loras(names, fusion=...)`` runs several community LoRAs through one
fusion, with gates per layer and per step (``x2edit.adapters.fusion``; unlike ``fuse_lora`` nothing is
merged into the weights), and a call with ``lora_index=INDEX, auto_lora_top_k=k`` retrieves the k LoRAs
nearest to the instruction from an index, loads them, fuses them for that call and removes them again.

The learned gate and the index belong to the retrieval layer, one floor up, which this module does not
import: they are handed in as objects (``fusion=x2edit.retrieval.LearnedGate()``,
``lora_index=x2edit.retrieval.LoraIndex(path)``). So the core runs and is tested without that layer, and
any object with the same members serves (another index behind ``search``, another gate).
"""

from __future__ import annotations

import contextlib
import logging

from x2edit.adapters import adapter_layers, adapter_names, remove_adapter, residual_adapters, set_adapters
from x2edit.adapters.community import (
    community_lora_scale,
    community_loras,
    community_weights,
    fuse_community_loras,
    fused_community_loras,
    load_community_lora,
    set_community_weights,
    unfuse_community_loras,
    unload_community_loras,
)
from x2edit.adapters.fusion import TRAINING_FREE, Fusion, fused_forward, make_fusion

logger = logging.getLogger(__name__)

# The cosine (instruction vs LoRA weights) below which a retrieved LoRA is not fused: a hit at 0.04 or -0.01 is
# the nearest of unrelated LoRAs, and fusing it at weight 1 only damages the edit. A chosen floor, not yet
# calibrated on a measured score distribution of relevant and unrelated LoRAs; a call or an index may set its own.
AUTO_LORA_MIN_SCORE = 0.15


def layer_weight(model, name: str) -> float:
    """The ``set_adapters`` weight of adapter ``name`` (the same in every layer that holds it)."""
    for _, layer in adapter_layers(model):
        if name in layer.adapters:
            return layer.adapter_weights[name]
    raise ValueError(f"no adapter named {name!r}")


_COMPONENTS = ("transformer", "text_encoder")  # stock's LoRA-loadable components of a Flux pipeline


class X2EditLoraMixin:
    """diffusers' LoRA/adapter methods on x2edit adapter layers (see the module docstring for the rule).

    Needs ``self.transformer``. Text-encoder LoRAs are not loaded (their keys are skipped with a
    warning), so ``components=["text_encoder"]`` has nothing to act on.
    """

    # {name: weight} of the community LoRAs while disable_lora() is in force (their layer weights are 0
    # meanwhile); None while enabled.
    _disabled_lora_weights: dict[str, float] | None = None
    # The multi-LoRA fusion set by fuse_loras() (an x2edit.adapters.fusion.Fusion), None without one.
    _lora_fusion = None
    # The hits of the last call's lora_index= retrieval ([{rank, file, score, title, ...}]).
    retrieved_loras: list[dict] | None = None

    # -- loading -------------------------------------------------------------------------------
    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          hotswap: bool = False, **kwargs):
        """Load a community Flux LoRA (kohya, ComfyUI, XLabs, diffusers/PEFT) beside the x2edit adapter.

        Args:
            pretrained_model_name_or_path_or_dict: a .safetensors file, a directory (``weight_name=``), or
                a state dict.
            adapter_name: default ``default_{n}`` for the n-th community LoRA, as stock names them.
            **kwargs: how to find the file (weight_name, subfolder, ...), as stock's ``lora_state_dict``.
        """
        if hotswap:
            raise ValueError("hotswap is not supported by x2edit's adapter layers: delete_adapters() and load again")
        kwargs.pop("low_cpu_mem_usage", None)  # stock's loading-speed option; nothing to speed up here
        if adapter_name is None:
            taken, i = set(adapter_names(self.transformer)), len(community_loras(self.transformer))
            while f"default_{i}" in taken:
                i += 1
            adapter_name = f"default_{i}"
        load_community_lora(self.transformer, pretrained_model_name_or_path_or_dict, adapter_name, **kwargs)
        if self._disabled_lora_weights is not None:  # loaded while disabled: off until enable_lora()
            self._disabled_lora_weights[adapter_name] = 1.0
            set_community_weights(self.transformer, {adapter_name: 0.0})

    def unload_lora_weights(self, reset_to_overwritten_params: bool = False):
        """Remove every community LoRA (the x2edit adapter stays); a fused one stays in the base weights.

        reset_to_overwritten_params: accepted for stock's signature; x2edit never expands base layers.
        """
        unload_community_loras(self.transformer)
        self._disabled_lora_weights = None

    # -- fusing --------------------------------------------------------------------------------
    def fuse_lora(self, components=("transformer",), lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: list[str] | None = None, **kwargs):
        """Fold community LoRAs into the base weights at ``lora_scale`` times their weight.

        Args:
            adapter_names: the LoRAs to fuse; default: the active ones.
            safe_fusing: accepted for stock's signature; fused weights are always checked finite.
        The LoRAs stay multiplied by ``lora_scale`` after ``unfuse_lora``, as in stock.
        """
        self._check_components(components)
        if "transformer" not in components:
            return
        if self._disabled_lora_weights is not None:
            raise ValueError("the LoRAs are disabled: enable_lora() before fuse_lora()")
        residual = residual_adapters(self.transformer)
        if residual:  # a fused LoRA is part of the base that the residual reading subtracts: it would cancel
            raise ValueError(f"the editing adapter {residual} reads its change against the base's own output; a "
                             "LoRA fused into the base would cancel there: keep community LoRAs unfused")
        loras = community_loras(self.transformer)
        if adapter_names is None:
            active = set(self.get_active_adapters())
            names = [n for n in loras if n in active]
        else:
            names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
            for n in names:
                if n not in loras:
                    raise ValueError(f"fuse_lora: {n!r} is not a LoRA loaded with load_lora_weights (those are "
                                     f"{loras}); merge an x2edit adapter with x2edit.adapters.merge_adapter")
        fuse_community_loras(self.transformer, names, lora_scale)

    def unfuse_lora(self, components=("transformer", "text_encoder"), **kwargs):
        """Take the fused community LoRAs out of the base weights again (an x2edit adapter merged with
        ``merge_adapter`` stays merged)."""
        self._check_components(components)
        if "transformer" in components:
            unfuse_community_loras(self.transformer)

    @property
    def fused_loras(self) -> set[str]:
        return set(fused_community_loras(self.transformer))

    @property
    def num_fused_loras(self) -> int:
        return len(self.fused_loras)

    # -- switching on and off ------------------------------------------------------------------
    def disable_lora(self):
        """Switch the community LoRAs off (their names and weights are kept for ``enable_lora``)."""
        if self._disabled_lora_weights is not None:
            return
        unfuse_community_loras(self.transformer)  # stock unfuses a disabled LoRA too (at its next forward)
        weights = community_weights(self.transformer)
        set_community_weights(self.transformer, dict.fromkeys(weights, 0.0))
        self._disabled_lora_weights = weights

    def enable_lora(self):
        """Switch the community LoRAs back on with the weights they had (or were given meanwhile)."""
        if self._disabled_lora_weights is None:
            return
        set_community_weights(self.transformer, self._disabled_lora_weights)
        self._disabled_lora_weights = None

    def _community_lora_scale(self, joint_attention_kwargs: dict | None):
        """Context for one call: the ``scale`` of ``joint_attention_kwargs`` multiplies the community LoRAs."""
        return community_lora_scale(self.transformer, (joint_attention_kwargs or {}).get("scale", 1.0))

    # -- several LoRAs through one fusion (AutoLoRA) ----------------------------------------------
    def fuse_loras(self, names: list[str], fusion="sum", weights: list[float] | None = None):
        """Run community LoRAs ``names`` together through one fusion, per layer and per step.

        Args:
            names: LoRAs loaded with ``load_lora_weights``; they are activated beside the active x2edit
                adapters (the editing adapter stays as it is), other community LoRAs are switched off.
            fusion: a training-free fusion by name: "sum", "average", "switch" (every 5 steps), "composite",
                "klora" (two LoRAs: [subject, style]), "topk_select" (``x2edit.adapters.fusion``), or a
                callable ``(transformer, names, weights) -> Fusion``: a learned one such as
                ``x2edit.retrieval.LearnedGate()`` (per layer, noise level, LoRA and instruction), or one with
                options, e.g. ``lambda tf, n, w: make_fusion("switch", n, w, tau=2)``.
            weights: per-LoRA multipliers (default 1).
        All k LoRAs of a layer stay one kernel call (stacked, gated per sample). ``unfuse_loras()`` ends it.
        Returns the fusion.
        """
        names = [names] if isinstance(names, str) else list(names)
        if not isinstance(fusion, str) and not callable(fusion):
            raise ValueError(f"fusion must be one of {TRAINING_FREE} or a learned gate such as "
                             f"x2edit.retrieval.LearnedGate(), got {type(fusion).__name__}")
        loras = community_loras(self.transformer)
        unknown = [n for n in names if n not in loras]
        if unknown:
            raise ValueError(f"fuse_loras: {unknown} are not LoRAs loaded with load_lora_weights (those are {loras})")
        if self.fused_loras & set(names):
            raise ValueError(f"LoRAs {sorted(self.fused_loras & set(names))} are merged into the base weights: "
                             "unfuse_lora() first")
        built = make_fusion(fusion, names, weights) if isinstance(fusion, str) else fusion(self.transformer, names, weights)
        if not isinstance(built, Fusion):
            raise ValueError(f"the fusion {fusion!r} built a {type(built).__name__}, not an x2edit.adapters.fusion.Fusion")
        editing = [n for n in self.get_active_adapters() if n not in loras]
        set_adapters(self.transformer, editing + names,
                     [layer_weight(self.transformer, n) for n in editing] + [1.0] * len(names))
        self._lora_fusion = built.bind(self.transformer)
        return self._lora_fusion

    def unfuse_loras(self):
        """End ``fuse_loras``: the LoRAs stay loaded and active, summed as ``set_adapters`` does."""
        self._lora_fusion = None

    @contextlib.contextmanager
    def with_loras(self, files: list[str], fusion="sum", weights: list[float] | None = None,
                   prefix: str = "call_lora"):
        """Load LoRA ``files`` for the calls inside the block, fused (``fuse_loras``) with the community LoRAs
        already active, and on leaving delete them and put back the active adapters, their weights and the
        fusion set before. Yields the new LoRAs' adapter names.

            with pipe.with_loras(["red.safetensors", "sepia.safetensors"], fusion="sum", weights=[1, 0.8]):
                image = pipe(image=img, prompt="a red background in sepia").images[0]

        ``weights`` are the files'; an active LoRA joins the block's fusion at the weight it has (its
        ``set_adapters`` weight times its weight in the fusion set before, e.g. by ``fuse_loras(["A", "B"],
        "klora", weights)``; that fusion's kind is replaced by ``fusion`` for the block).
        """
        previous, loras = self._lora_fusion, community_loras(self.transformer)
        active = {n: layer_weight(self.transformer, n) for n in self.get_active_adapters()}
        kept = [n for n in active if n in loras and n not in self.fused_loras]
        fused = dict(zip(previous.names, previous.weights)) if previous is not None else {}
        kept_weights = [active[n] * fused.get(n, 1.0) for n in kept]
        if weights is not None and len(weights) != len(files):
            raise ValueError(f"got {len(weights)} weights for {len(files)} LoRA files")
        names = []
        try:
            for i, file in enumerate(files):
                self.load_lora_weights(file, adapter_name=f"{prefix}_{i}")
                names.append(f"{prefix}_{i}")
            if names:
                self.fuse_loras(kept + names, fusion=fusion,
                                weights=kept_weights + list(weights or [1.0] * len(names)))
            yield names
        finally:
            self._lora_fusion = previous
            if names:
                self.delete_adapters(names)
                set_adapters(self.transformer, list(active), list(active.values()))

    @contextlib.contextmanager
    def _lora_fusion_call(self, prompts: list[str] | None, kwargs: dict):
        """One call's AutoLoRA and fusion: pops ``lora_index``, ``auto_lora_top_k`` (default 3),
        ``auto_lora_fusion`` (default: the index's ``default_fusion``) and ``auto_lora_min_score`` (default: the
        index's ``min_score``, else ``AUTO_LORA_MIN_SCORE``) from the call's kwargs; retrieves distinct hits with
        the instruction (``index.search(query, k, distinct=True)``), loads and fuses those scoring at least the
        floor for the call (``with_loras``), and removes them after. ``retrieved_loras`` lists every hit with
        "used" (and, when False, the "reason")."""
        index, top_k = kwargs.pop("lora_index", None), kwargs.pop("auto_lora_top_k", None)
        kind, min_score = kwargs.pop("auto_lora_fusion", None), kwargs.pop("auto_lora_min_score", None)
        if index is None and (top_k is not None or min_score is not None):
            what = "auto_lora_top_k=" if top_k is not None else "auto_lora_min_score="
            raise ValueError(f"{what} needs lora_index= (the index to retrieve LoRAs from)")
        if index is not None and not callable(getattr(index, "search", None)):
            raise ValueError(f"lora_index= takes an index object, e.g. x2edit.retrieval.LoraIndex({str(index)!r}), "
                             f"not a {type(index).__name__}")
        with contextlib.ExitStack() as stack:
            if index is not None:
                if not prompts or len(set(prompts)) != 1:
                    raise ValueError("lora_index= retrieves one set of LoRAs per call, with the instruction: pass one "
                                     "instruction (prompt=)")
                hits = index.search(prompts[0], k=3 if top_k is None else int(top_k), distinct=True)
                floor = float(min_score if min_score is not None else getattr(index, "min_score", AUTO_LORA_MIN_SCORE))
                for hit in hits:  # a LoRA unrelated to the instruction is not fused at full weight: not at all
                    hit["used"] = hit.get("score", floor) >= floor
                    if not hit["used"]:
                        hit["reason"] = f"score {hit['score']:.3f} below the floor {floor:g} (auto_lora_min_score)"
                self.retrieved_loras = hits
                kind = kind if kind is not None else getattr(index, "default_fusion", "sum")
                stack.enter_context(self.with_loras([hit["file"] for hit in hits if hit["used"]], fusion=kind,
                                                    prefix="auto_lora"))
            fusion = self._lora_fusion
            if fusion is not None:
                fusion.set_prompts(prompts)  # a gate that reads the instruction embeds this call's
                stack.enter_context(fused_forward(self.transformer, fusion))
            yield

    # -- every adapter -------------------------------------------------------------------------
    def set_adapters(self, adapter_names: list[str] | str, adapter_weights: float | list[float] | None = None):
        """Activate ``adapter_names`` (x2edit adapters and community LoRAs alike; the others are switched
        off) with per-adapter weights (default 1.0)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
        if any(isinstance(w, dict) for w in weights):
            raise ValueError("per-block adapter weights (dicts) are not supported by x2edit's adapter layers; "
                             "give one number per adapter")
        weights = [1.0 if w is None else w for w in weights]
        fused = sorted(set(names) & self.fused_loras)
        if fused:
            raise ValueError(f"LoRAs {fused} are fused into the base weights: unfuse_lora() before setting "
                             "their weights")
        editing = [n for n in self.get_active_adapters() if n not in community_loras(self.transformer)]
        set_adapters(self.transformer, names, weights)
        off = [n for n in editing if n not in names]
        if off:
            logger.warning("set_adapters(%s) switches off the x2edit editing adapter %s; name it to keep it on",
                           names, off)
        if self._disabled_lora_weights is not None:  # disabled: remember the new weights, keep them off
            new = {n: w for n, w in zip(names, weights) if n in self._disabled_lora_weights}
            self._disabled_lora_weights.update(new)
            set_community_weights(self.transformer, dict.fromkeys(new, 0.0))

    def delete_adapters(self, adapter_names: list[str] | str):
        """Delete adapters by name (x2edit adapters or community LoRAs); unknown names are refused first."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        loaded = self.get_list_adapters().get("transformer", [])
        missing = sorted(set(names) - set(loaded))
        if missing:
            raise ValueError(f"unknown adapters {missing}; loaded: {loaded}")
        fused = sorted(set(names) & self.fused_loras)
        if fused:
            raise ValueError(f"LoRAs {fused} are fused into the base weights: unfuse_lora() first "
                             "(or unload_lora_weights() to keep them fused)")
        for name in names:
            remove_adapter(self.transformer, name)
            if self._disabled_lora_weights is not None:
                self._disabled_lora_weights.pop(name, None)

    def get_list_adapters(self) -> dict[str, list[str]]:
        """{"transformer": every adapter's name}, or {} without adapters (as stock)."""
        names = adapter_names(self.transformer)
        return {"transformer": names} if names else {}

    def get_active_adapters(self) -> list[str]:
        """Names of the active adapters (x2edit adapters and community LoRAs), in activation order."""
        names: dict[str, None] = {}
        for _, layer in adapter_layers(self.transformer):
            names.update(dict.fromkeys(layer.active_adapters))
        return list(names)

    # -- not supported -------------------------------------------------------------------------
    def set_lora_device(self, adapter_names, device):
        raise NotImplementedError("set_lora_device is not supported by x2edit's adapter layers; move the "
                                  "whole pipeline with .to(device)")

    def enable_lora_hotswap(self, **kwargs):
        raise NotImplementedError("LoRA hotswapping is not supported by x2edit's adapter layers")

    # -- checks --------------------------------------------------------------------------------
    @staticmethod
    def _check_components(components) -> None:
        unknown = sorted(set(components) - set(_COMPONENTS))
        if unknown or not components:
            raise ValueError(f"components must be a non-empty subset of {list(_COMPONENTS)}, got {components!r}")
