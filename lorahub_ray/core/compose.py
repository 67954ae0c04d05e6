"""Composition of K LoRA modules into one LoRA slot of a model.

Merge methods are small functions chosen by name (``MERGE_METHODS``), mergekit style. The
default, ``linear``, is the reference ``lorahub`` 0.1.0 rule: composed ``A = Σ wᵢ·Aᵢ`` and
``B = Σ wᵢ·Bᵢ``, with A and B summed separately.

:class:`LoraComposer` wraps the base model with PEFT once, stacks the K modules' tensors once
into a ``[K, n]`` matrix, and makes every LoRA parameter of the model a view into one flat
buffer of length ``n``. A search step is then one matrix-vector product written in place (for a
subset of at most half of the modules, one pass over each of its rows): no re-wrapping of the
model and no copies of state dicts.

The cost of a step over a bare forward of the base model (measured in docs/step-cost.md):

* **The output projection gets a contiguous input.** PEFT freezes the base weights, and ``torch.matmul``
  folds a non-contiguous 3-D input into one matrix product only when the weight requires a gradient
  (pytorch/pytorch#166891). The causal family's loss keeps the logits of the answer positions only, a
  non-contiguous slice of the hidden states: with the frozen output projection the product ran as a
  ``bmm`` over the weight expanded once per example (SmolLM2: five passes over a 49152 x 576 matrix,
  about 10% of a step). A pre-hook on the output projection copies its input to contiguous memory
  (5 x 6 x 576 numbers) first, as the bare model folds it.
* **Each adapted layer takes the cheaper of two exact paths for one candidate** (see
  :class:`_LeanLoraForward`): it adds the low-rank update to the base product (unmerged), or multiplies
  by ``W₀ + s·B·A``, merged once per composition into a weight of the layer's own. ``W₀`` is never
  written, so there is nothing to restore: a failing forward, tied weights (a LoRA on a tied output
  projection leaves the input embeddings alone) and other users of the base weights are unaffected.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Sequence

import torch

from lorahub_ray.errors import IncompatibleModulesError
from lorahub_ray.core.families import family_of
from lorahub_ray.core.modules import LoraModule

ADAPTER_NAME = "lorahub"


def linear(weights: torch.Tensor, stacked: torch.Tensor, out: torch.Tensor,
           subset: Sequence[int] | None = None) -> torch.Tensor:
    """The reference rule: every LoRA tensor (A and B alike) is the weighted sum of the modules' tensors.

    With ``subset`` (rows of ``stacked``), ``weights`` belong to those modules alone and the others
    count 0: the sum reads their rows only, one pass each, instead of the whole hub."""
    if subset is None:
        return torch.mv(stacked.T, weights, out=out)
    torch.mul(stacked[subset[0]], weights[0], out=out)
    for row, w in zip(subset[1:], weights[1:].tolist()):
        out.add_(stacked[row], alpha=w)
    return out


# a merge method: (weights, stacked [K, n], out [n], subset of rows or None) -> out
MERGE_METHODS: dict[str, Callable[..., torch.Tensor]] = {"linear": linear}


def lora_config(module: LoraModule, *, base_model_name_or_path: str | None = None):
    """The PEFT ``LoraConfig`` of a module, for inference (no dropout)."""
    from peft import LoraConfig

    known = set(LoraConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in module.config.items() if k in known and k not in ("peft_type", "revision")}
    kwargs["inference_mode"] = True
    kwargs["lora_dropout"] = 0.0
    if base_model_name_or_path is not None:
        kwargs["base_model_name_or_path"] = base_model_name_or_path
    return LoraConfig(**kwargs)


# The rule that picks a layer's path for one candidate. Both paths are memory-bound on CPU, at about the same
# cost per element read or written (docs/step-cost.md, benchmarks/step_cost.py --layers): the unmerged update
# touches rows·(in + 2·out) elements per call, plus a fixed cost of its two small kernels (CALL_ELEMENTS);
# merging touches 2·in·out, once per composition. A layer merges on the call at which the unmerged updates of this
# composition, that call's included, would reach the merge's cost: rent or buy, never more than twice the cheaper
# choice in hindsight, and decided by the shapes alone, so that a search's values do not depend on timings.
CALL_ELEMENTS = 16_384
MERGE_INTO_WEIGHTS = ("auto", "always", "never")


class _Slot:
    """What the lean forwards of a composer share: how many candidates the current forward pass holds and
    the rows of their composed LoRAs (see :meth:`LoraComposer.candidates`), and when a layer merges
    (:attr:`LoraComposer.merge_into_weights`)."""

    def __init__(self, buffer: torch.Tensor):
        self.buffer = buffer  # the single composition, which every LoRA parameter views
        self.count = 0
        self.rows: torch.Tensor | None = None
        self.merge_into_weights = "auto"


class _LeanLoraForward:
    """The forward of one PEFT LoRA ``Linear`` in the one case a search runs: no gradients, the composed
    adapter alone active and unmerged in PEFT's sense, no extra arguments, a plain ``nn.Linear`` base layer.
    Any other case takes PEFT's own forward. The tensors are looked up once, not on every call.

    One candidate (``slot.count`` <= 1), two exact paths:

    * unmerged: ``F.linear`` on the base weights, then the low-rank update added in place with one
      ``addmm_`` (``result += s·(x Aᵀ) Bᵀ``), instead of PEFT's separate multiply and out-of-place add;
    * merged: ``F.linear`` on ``W₀ + s·B·A``, written by one ``addmm`` into this layer's own weight
      (allocated on the first merge: the adapted weights are the only copy kept) and reused until the
      composition, ``W₀`` or the scaling changes (its key: the version counters of the composer's buffer,
      of A, B and ``W₀``, which every in-place write bumps, ``W₀``'s address and the scaling).

    ``slot.merge_into_weights`` picks: ``"auto"`` (the rent-or-buy rule above), ``"always"``, ``"never"``. Merging needs the
    base weight in float32 or float64, in the adapter's dtype and on its device (a merge in half precision would
    round the update into the weight); otherwise the layer stays unmerged.

    Several candidates (``slot.count`` > 1): the rows of ``x`` are that many candidates' copies of the examples,
    candidate-major, and candidate ``i`` gets the LoRA composed in row ``i`` of ``slot.rows``: the base matmul
    runs once for all, the low-rank update once per candidate with the operations of the unmerged path.
    """

    def __init__(self, layer, slot: _Slot, a_offset: int, b_offset: int):
        self.peft_forward = types.MethodType(type(layer).forward, layer)
        self.layer, self.base, self.slot = layer, layer.base_layer, slot
        self.a = layer.lora_A[ADAPTER_NAME].weight  # views of the composer's buffer
        self.b = layer.lora_B[ADAPTER_NAME].weight
        self.a_t, self.b_t = self.a.T, self.b.T  # views too: they follow every compose
        self.a_offset, self.b_offset = a_offset, b_offset
        out_features, in_features = self.base.weight.shape
        self.row_cost, self.merge_cost = in_features + 2 * out_features, 2 * in_features * out_features
        weight = self.base.weight
        self.can_merge = (weight.dtype == self.a.dtype and weight.dtype in (torch.float32, torch.float64)
                          and weight.device == self.a.device and not getattr(layer, "fan_in_fan_out", False))
        self.merged: torch.Tensor | None = None  # W₀ + s·B·A, valid while self.key holds and self.fresh
        self.key, self.paid, self.fresh = None, 0, False

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        layer = self.layer
        if (args or kwargs or torch.is_grad_enabled() or layer.disable_adapters or layer.merged_adapters
                or layer.active_adapters != [ADAPTER_NAME] or x.dtype != self.a.dtype):
            return self.peft_forward(x, *args, **kwargs)
        scaling = layer.scaling[ADAPTER_NAME]
        if self.slot.count > 1:
            return self._candidates(x, scaling)
        weight = self.base.weight
        key = self._key() if self.can_merge and self.slot.merge_into_weights != "never" else None
        if key is not None:
            if key != self.key:
                self.key, self.paid, self.fresh = key, 0, False
            if not self.fresh:
                self.paid += x.numel() // x.shape[-1] * self.row_cost + CALL_ELEMENTS
                if self.slot.merge_into_weights == "always" or self.paid >= self.merge_cost:
                    if self.merged is None:
                        self.merged = torch.empty_like(weight)
                    torch.addmm(weight, self.b, self.a, alpha=scaling, out=self.merged)
                    self.fresh = True
            if self.fresh:
                return torch.nn.functional.linear(x, self.merged, self.base.bias)
        result = torch.nn.functional.linear(x, weight, self.base.bias)
        result.view(-1, result.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]) @ self.a_t, self.b_t, alpha=scaling)
        return result

    def _key(self) -> tuple | None:
        """What the merged weight depends on (see the class docstring); ``None`` when one of those tensors is an
        inference tensor (made under ``torch.inference_mode``), which keeps no version counter: then the layer
        cannot tell a changed composition and stays unmerged."""
        weight, tensors = self.base.weight, (self.slot.buffer, self.a, self.b, self.base.weight)
        if any(t.is_inference() for t in tensors):
            return None
        return (*(t._version for t in tensors), weight.data_ptr(), self.layer.scaling[ADAPTER_NAME])

    def is_merged(self) -> bool:
        """Whether the merged weight holds the current composition."""
        return self.fresh and self.key is not None and self.key == self._key()

    def _candidates(self, x: torch.Tensor, scaling: float) -> torch.Tensor:
        count, a, b = self.slot.count, self.a, self.b
        result = torch.nn.functional.linear(x, self.base.weight, self.base.bias)
        xs, outs = x.reshape(count, -1, x.shape[-1]), result.view(count, -1, result.shape[-1])
        for i in range(count):
            row = self.slot.rows[i]
            a_i = row[self.a_offset : self.a_offset + a.numel()].view(a.shape)
            b_i = row[self.b_offset : self.b_offset + b.numel()].view(b.shape)
            outs[i].addmm_(xs[i] @ a_i.T, b_i.T, alpha=scaling)
        return result


def _check_merge_into_weights(value: str) -> None:
    if value not in MERGE_INTO_WEIGHTS:
        raise ValueError(f"unknown merge_into_weights {value!r}; choose from {list(MERGE_INTO_WEIGHTS)}")


def _contiguous_input(module, args):
    """A forward pre-hook: the first argument in contiguous memory (see the module's docstring)."""
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


class LoraComposer:
    """Holds a base model wrapped with one LoRA slot and the K modules stacked, and writes
    ``compose(weights)`` into that slot in place.

    ``model`` must already be on its final device and dtype; it is wrapped in place.

    ``merge_into_weights`` picks how an adapted layer runs one candidate: ``"auto"`` (the cheaper of adding
    the low-rank update and merging it into a copy of the layer's weight, by the rule of
    :data:`CALL_ELEMENTS`), ``"always"`` merged, ``"never"`` unmerged. All three give the same values up to
    rounding; the base weights are never written. Several candidates in one pass always run unmerged.
    """

    def __init__(self, model, modules: Sequence[LoraModule], *, merge_method: str = "linear",
                 merge_into_weights: str = "auto"):
        from peft import get_peft_model

        if merge_method not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {merge_method!r}; choose from {sorted(MERGE_METHODS)}")
        _check_merge_into_weights(merge_into_weights)  # before the model is wrapped
        self.modules = list(modules)
        self.merge_method = merge_method
        self._merge = MERGE_METHODS[merge_method]
        self.family = family_of(model.config)
        for module in self.modules:  # a CAUSAL_LM adapter on a seq2seq base (or the reverse) fails here, by name
            self.family.check_module(module, model.config.model_type)
        first = self.modules[0]
        config = lora_config(first, base_model_name_or_path=getattr(model, "name_or_path", None))
        try:
            self.peft_model = get_peft_model(model, config, adapter_name=ADAPTER_NAME)
        except ValueError as exc:  # PEFT's "Target modules {...} not found in the base model"
            raise IncompatibleModulesError(f"module '{first.name}' ({first.path / 'adapter_config.json'}) does not fit "
                                           f"the base model: {str(exc).splitlines()[0]}") from None
        self.peft_model.eval()
        self._bind()
        self.merge_into_weights = merge_into_weights
        head = self.peft_model.get_base_model().get_output_embeddings()
        self._head_hook = head.register_forward_pre_hook(_contiguous_input) if head is not None else None

    def _bind(self) -> None:
        """Stack the modules' tensors as ``[K, n]`` and make the LoRA parameters views of one buffer."""
        marker = f".{ADAPTER_NAME}."
        params = {
            name.replace(marker, "."): p
            for name, p in self.peft_model.named_parameters()
            if marker in name and (".lora_A." in name or ".lora_B." in name)
        }
        first = self.modules[0]
        keys = list(first.state_dict)
        for key in keys:
            if key not in params:
                raise IncompatibleModulesError(
                    f"module '{first.name}' has tensor '{key}' that matches no LoRA layer of the base model"
                )
            if tuple(params[key].shape) != tuple(first.state_dict[key].shape):
                raise IncompatibleModulesError(
                    f"module '{first.name}' has {key} of shape {tuple(first.state_dict[key].shape)} "
                    f"but the base model needs {tuple(params[key].shape)}"
                )
        unmatched = sorted(set(params) - set(keys))
        if unmatched:
            raise IncompatibleModulesError(f"module '{first.name}' lacks tensor '{unmatched[0]}' for the base model")
        # PEFT keeps adapters in float32 even on half-precision models: follow the LoRA parameters
        self.device, self.dtype = params[keys[0]].device, params[keys[0]].dtype
        sizes = [first.state_dict[k].numel() for k in keys]
        total = sum(sizes)
        self.stacked = torch.empty(len(self.modules), total, dtype=self.dtype, device=self.device)
        for i, module in enumerate(self.modules):
            # copy_ converts the dtype and crosses devices (modules load on the CPU; the model may be on a GPU)
            shared = module.state_dict[keys[0]].dtype == self.dtype and module.state_dict[keys[0]].device == self.device
            offset = 0
            for key, size in zip(keys, sizes):
                row = self.stacked[i, offset : offset + size]
                row.copy_(module.state_dict[key].reshape(-1))
                if shared:  # the module's tensors become views of its row: same values, stored once
                    module.state_dict[key] = row.view(module.state_dict[key].shape)
                offset += size
        self.buffer = torch.zeros(total, dtype=self.dtype, device=self.device)
        self.offsets, offset = {}, 0
        for key, size in zip(keys, sizes):
            p = params[key]
            p.requires_grad_(False)
            p.data = self.buffer[offset : offset + size].view(p.shape)
            self.offsets[id(p)] = offset
            offset += size
        self.keys = keys
        self._batch = _Slot(self.buffer)
        self._install_lean_forward()

    def _install_lean_forward(self) -> None:
        """Give every LoRA ``Linear`` of the slot a leaner forward for inference (see :class:`_LeanLoraForward`)."""
        from peft.tuners.lora.layer import Linear

        for layer in self.peft_model.modules():
            if (type(layer) is Linear and type(layer.base_layer) is torch.nn.Linear and ADAPTER_NAME in layer.lora_A
                    and ADAPTER_NAME not in layer.lora_variant and not layer.lora_bias.get(ADAPTER_NAME, False)):
                a, b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
                layer.forward = _LeanLoraForward(layer, self._batch, self.offsets[id(a)], self.offsets[id(b)])

    @property
    def num_modules(self) -> int:
        return len(self.modules)

    @property
    def model(self):
        """The wrapped model, whose forward uses the composed LoRA."""
        return self.peft_model

    def merged_layers(self) -> int:
        """How many adapted layers hold their weight merged with the current composition (a forward
        pass since the last compose merges them, as :attr:`merge_into_weights` says)."""
        return sum(1 for layer in self.peft_model.modules()
                   if isinstance(vars(layer).get("forward"), _LeanLoraForward) and layer.forward.is_merged())

    @property
    def merge_into_weights(self) -> str:
        """``"auto"``, ``"always"`` or ``"never"``: see the class docstring."""
        return self._batch.merge_into_weights

    @merge_into_weights.setter
    def merge_into_weights(self, value: str) -> None:
        _check_merge_into_weights(value)
        self._batch.merge_into_weights = value

    def _weights(self, weights: Sequence[float], modules: Sequence[int] | None = None):
        """``weights`` checked, as the merge method takes them: a tensor and the subset of rows it
        covers (``None``: all of them). A subset of at most half of the modules is summed from its
        own rows (a search over 20 of 196 modules then reads about a tenth of the hub per step);
        a larger one is given zeros for the other modules and summed like the whole hub."""
        w = torch.as_tensor(list(map(float, weights)), dtype=self.dtype, device=self.device)
        if modules is None:
            if w.shape != (self.num_modules,):
                raise ValueError(f"expected {self.num_modules} weights, got {w.numel()}")
            return w, None
        subset = [int(i) for i in modules]
        if not subset or len(set(subset)) != len(subset) or not all(0 <= i < self.num_modules for i in subset):
            raise ValueError(f"modules must be distinct module indices below {self.num_modules}, got {subset}")
        if w.shape != (len(subset),):
            raise ValueError(f"expected {len(subset)} weights, one per module of the subset, got {w.numel()}")
        if 2 * len(subset) <= self.num_modules:
            return w, subset
        full = torch.zeros(self.num_modules, dtype=self.dtype, device=self.device)
        full[subset] = w
        return full, None

    def compose(self, weights: Sequence[float], modules: Sequence[int] | None = None) -> None:
        """Write the composition of the modules with ``weights`` into the model's LoRA slot.

        With ``modules`` (indices), ``weights`` belong to those modules and the others get weight 0:
        the composition of that subset alone."""
        w, subset = self._weights(weights, modules)
        self._merge(w, self.stacked, self.buffer, subset)

    @contextlib.contextmanager
    def candidates(self, weights: Sequence[Sequence[float]], modules: Sequence[int] | None = None):
        """Compose several weight vectors at once, one per candidate; inside the ``with`` block a
        forward pass whose rows are the candidates' copies of the examples, candidate-major (each
        copy the same size), gives each candidate its own composed LoRA. A candidate's composition
        is computed exactly as :meth:`compose` computes it (``modules`` as there). Yields the number
        of candidates."""
        rows = [self._weights(w, modules) for w in weights]
        if not rows:
            raise ValueError("no candidates")
        if len(rows) == 1:
            w, subset = rows[0]
            self._merge(w, self.stacked, self.buffer, subset)
            yield 1
            return
        if self._batch.rows is None or self._batch.rows.shape[0] < len(rows):
            self._batch.rows = torch.empty(len(rows), self.buffer.numel(), dtype=self.dtype, device=self.device)
        for i, (w, subset) in enumerate(rows):  # each as compose computes it: the same values
            self._merge(w, self.stacked, self._batch.rows[i], subset)
        self._batch.count = len(rows)
        try:
            yield len(rows)
        finally:
            self._batch.count = 0

    @contextlib.contextmanager
    def restrict(self, modules: Sequence[int]):
        """Inside the ``with`` block the composer holds only the modules at ``modules`` (hub indices, in
        that order), as if it had been built from them alone: weights are one per module of the subset,
        and every composition is computed exactly as such a composer computes it (the subset's rows are
        copied once into a stack of their own). A search over a preselected subset then follows the
        very path of a search given those modules directly."""
        subset = [int(i) for i in modules]
        if not subset or len(set(subset)) != len(subset) or not all(0 <= i < self.num_modules for i in subset):
            raise ValueError(f"modules must be distinct module indices below {self.num_modules}, got {subset}")
        saved = self.stacked, self.modules
        self.stacked, self.modules = self.stacked[subset], [self.modules[i] for i in subset]
        try:
            yield self
        finally:
            self.stacked, self.modules = saved

    def merge_and_unload(self, weights: Sequence[float]):
        """Compose with ``weights``, merge into the base weights and return the plain base model.

        The composer is spent afterwards: the returned model no longer has a LoRA slot.
        """
        self.compose(weights)
        if self._head_hook is not None:
            self._head_hook.remove()
        merged = self.peft_model.merge_and_unload()
        self.peft_model = None
        return merged
