"""The cost of a search step (docs/step-cost.md): each adapted layer runs one candidate unmerged or on its weight
merged with the composed update (``merge_into_weights``), by a rule on the shapes. Every path gives today's
objective (both families, both losses); the base weights are never written, even by a forward that fails half-way;
a LoRA on a tied output projection leaves the input embeddings alone; the causal loss runs its output projection as
one matrix product."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import lorahub_ray as lr
from helpers import EXAMPLES, make_llama_base, make_llama_module, make_module
from lorahub_ray.core import compose
from lorahub_ray.core.compose import LoraComposer
from lorahub_ray.core.model import load_base_model
from lorahub_ray.core.objective import FewShotObjective

INPUTS = [e["input"] for e in EXAMPLES]
OUTPUTS = [e["output"] for e in EXAMPLES]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The tiny Llama (tied input and output embeddings), three modules on every projection of its layers, and
    two that also adapt the tied output projection."""
    root = tmp_path_factory.mktemp("llama-step")
    base = make_llama_base(root / "base")
    modules = [make_llama_module(base, root / "hub" / f"m{i}", seed=i + 1) for i in range(3)]
    tied = [make_llama_module(base, root / "tied" / f"m{i}", seed=i + 7, targets=("q_proj", "v_proj", "lm_head"))
            for i in range(2)]
    for module in tied:  # PEFT also saves the tied embedding matrix beside such an adapter: the LoRA tensors alone
        tensors = load_file(module / "adapter_model.safetensors")
        save_file({k: v for k, v in tensors.items() if "lora_" in k}, module / "adapter_model.safetensors")
    return {"base": base, "modules": modules, "tied": tied}


@pytest.fixture(scope="module")
def realistic(world, llama, tmp_path_factory):
    """Modules whose composed update is about the size of the weights it adapts, as trained LoRAs are (the shared
    tiny modules' update is 30 to 70 times the weights), for each family."""
    root = tmp_path_factory.mktemp("realistic")
    return {"seq2seq": (world["base"], [make_module(world["base"], root / "t5" / f"m{i}", seed=i + 11, scale=0.05)
                                        for i in range(3)]),
            "causal": (llama["base"], [make_llama_module(llama["base"], root / "llama" / f"m{i}", seed=i + 11,
                                                         scale=0.03) for i in range(3)])}


def _composer(base, modules, **kwargs):
    model, tok, _ = load_base_model(str(base), device="cpu", dtype=kwargs.pop("dtype", None))
    return LoraComposer(model, [lr.load_module(str(p)) for p in modules], **kwargs), tok


def _family(world, llama, family):
    return (world["base"], world["modules"]) if family == "seq2seq" else (llama["base"], llama["modules"])


def _base_state(composer) -> dict[str, torch.Tensor]:
    """Every tensor of the base model (the LoRA slot left out), cloned."""
    return {k: v.clone() for k, v in composer.peft_model.get_base_model().state_dict().items() if "lora_" not in k}


def _lean_layers(composer):
    return [m for m in composer.model.modules() if isinstance(vars(m).get("forward"), compose._LeanLoraForward)]


@pytest.mark.parametrize("family", ["seq2seq", "causal"])
@pytest.mark.parametrize("loss,batch_size", [("reference", None), ("reference", 2), ("mean", None), ("mean", 1)])
def test_every_path_gives_todays_objective(realistic, family, loss, batch_size):
    """Merged, unmerged (the lean forward as it was) and chosen per layer: the same objective within 1e-5."""
    composer, tok = _composer(*realistic[family])
    objective = FewShotObjective(composer, tok, INPUTS, OUTPUTS, loss=loss, batch_size=batch_size)
    layers = len(_lean_layers(composer))
    assert layers == len(composer.keys) // 2  # every adapted layer has the lean forward
    rng = np.random.default_rng(5)
    n = composer.num_modules
    for weights in [[1.0] + [0.0] * (n - 1), list(rng.uniform(-1.5, 1.5, n)), list(rng.uniform(-1.5, 1.5, n))]:
        values = {}
        for path in ("never", "always", "auto"):
            composer.merge_into_weights = path
            values[path] = objective(weights)
            if path != "auto":
                assert composer.merged_layers() == (0 if path == "never" else layers)
        assert values["always"] == pytest.approx(values["never"], abs=1e-5)
        assert values["auto"] == pytest.approx(values["never"], abs=1e-5)
        with torch.inference_mode():  # the merged copies hold W₀ + s·B·A, not W₀: the paths did differ
            lean = _lean_layers(composer)[0].forward
            assert not torch.equal(lean.merged, lean.base.weight)


@pytest.mark.parametrize("family", ["seq2seq", "causal"])
def test_with_an_update_many_times_the_weights_the_merged_path_is_as_exact_as_todays(world, llama, family):
    """The shared tiny modules: W₀ + s·B·A rounds at the update's scale, so the two float32 paths differ by a few
    1e-6 relative; against the objective in float64, the merged path's error is of the unmerged one's size."""
    base, modules = _family(world, llama, family)
    composer, tok = _composer(base, modules)
    exact, tok64 = _composer(base, modules, dtype=torch.float64)
    objective, truth = (FewShotObjective(c, t, INPUTS, OUTPUTS, loss="mean") for c, t in ((composer, tok), (exact, tok64)))
    rng = np.random.default_rng(6)
    for weights in [list(rng.uniform(-1.5, 1.5, composer.num_modules)) for _ in range(3)]:
        value = truth(weights)
        errors = {}
        for path in ("never", "always"):
            composer.merge_into_weights = path
            errors[path] = abs(objective(weights) - value)
        assert errors["always"] == pytest.approx(0, abs=max(1e-5 * abs(value), 4 * errors["never"]))


def test_a_layer_merges_once_its_unmerged_updates_would_cost_as_much_as_merging(world, monkeypatch):
    """The rent-or-buy rule: unmerged while the rows of this composition's calls cost less than a merge
    (2·in·out elements, against in + 2·out per row), merged from the call that reaches it on, until the next compose."""
    monkeypatch.setattr(compose, "CALL_ELEMENTS", 0)  # rows alone, to count them exactly
    composer, _ = _composer(world["base"], world["modules"])
    layer = _lean_layers(composer)[0]
    lean, d_in, d_out = layer.forward, layer.in_features, layer.out_features
    per_row, merge = d_in + 2 * d_out, 2 * d_in * d_out
    below = merge // per_row  # rows that cost less than a merge, all calls together
    x = torch.randn(below + 4, d_in)
    composer.compose([0.8, -0.4, 1.1, 0.3])
    with torch.inference_mode():
        composer.merge_into_weights = "never"
        expected = layer(x)
        composer.merge_into_weights = "auto"
        first = layer(x[: below - 1])
        assert not lean.is_merged()
        second = layer(x[below - 1 : below])  # `below` rows in all: still below the merge
        assert not lean.is_merged()
        third = layer(x[below:])  # the call that would reach it merges first
        assert lean.is_merged()
        torch.testing.assert_close(torch.cat([first, second, third]), expected, rtol=1e-5, atol=1e-5)
        composer.compose([0.1, 0.2, 0.3, 0.4])  # a new composition: the merged copy is stale
        assert not lean.is_merged()
        layer(x[:1])
        assert not lean.is_merged()
        composer.merge_into_weights = "always"
        layer(x[:1])
        assert lean.is_merged()


@pytest.mark.parametrize("family", ["seq2seq", "causal"])
def test_a_forward_that_fails_half_way_leaves_the_base_weights_as_they_were(world, llama, family):
    composer, tok = _composer(*_family(world, llama, family), merge_into_weights="always")
    objective = FewShotObjective(composer, tok, INPUTS, OUTPUTS)
    before = _base_state(composer)
    first, second = [0.5, -0.7, 0.9, 0.2][: composer.num_modules], [1.2, 0.3, -0.8, 0.6][: composer.num_modules]
    value = objective(first)
    failing = _lean_layers(composer)[-1]  # the last adapted layer: the ones before it have merged

    def fail(*_):
        raise RuntimeError("failed half-way")

    handle = failing.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="failed half-way"):
            objective(second)
        assert composer.merged_layers() > 0  # layers did merge for the failing step before it failed
    finally:
        handle.remove()
    after = _base_state(composer)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert objective(first) == value  # the next step is exactly the one before the failure
    base, _, _ = load_base_model(str(_family(world, llama, family)[0]), device="cpu")
    batch = objective.batches[0]
    with torch.inference_mode(), composer.model.disable_adapter():  # the adapters off: the base model, bit for bit
        ours = composer.model(**batch, use_cache=False).logits
    with torch.inference_mode():
        assert torch.equal(ours, base(**batch, use_cache=False).logits)


def test_a_lora_on_a_tied_output_projection_leaves_the_input_embeddings_alone(llama):
    composer, tok = _composer(llama["base"], llama["tied"])
    model = composer.peft_model.get_base_model()
    embeddings = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    assert head.base_layer.weight is embeddings  # tied, and adapted
    objective = FewShotObjective(composer, tok, INPUTS, OUTPUTS)
    before = embeddings.clone()
    values = {}
    for path in ("never", "always"):
        composer.merge_into_weights = path
        values[path] = objective([0.9, -1.1])
    assert head.forward.is_merged()
    assert values["always"] == pytest.approx(values["never"], abs=1e-5)
    assert torch.equal(embeddings, before) and head.base_layer.weight is embeddings


def test_the_causal_loss_runs_its_output_projection_as_one_matrix_product(llama):
    """PEFT freezes the base weights, and torch.matmul then runs a non-contiguous 3-D input (the logits slice of
    the answer positions) as a bmm over the weight expanded per example; the composer's pre-hook prevents it."""
    from torch.profiler import profile

    composer, tok = _composer(llama["base"], llama["modules"])
    objective = FewShotObjective(composer, tok, INPUTS, OUTPUTS)
    vocab = composer.peft_model.get_base_model().get_output_embeddings().weight.shape[0]

    def bmm_over_the_vocabulary() -> bool:
        with torch.inference_mode(), profile(record_shapes=True) as prof:
            objective([0.4, 0.6, -0.2])
        return any(e.name == "aten::bmm" and any(vocab in shape for shape in e.input_shapes) for e in prof.events())

    value = objective([0.4, 0.6, -0.2])
    assert not bmm_over_the_vocabulary()
    composer._head_hook.remove()  # as PEFT leaves it
    assert bmm_over_the_vocabulary()
    assert objective([0.4, 0.6, -0.2]) == pytest.approx(value, abs=1e-6)


def test_merge_and_unload_returns_the_model_without_the_hook(world):
    composer, _ = _composer(world["base"], world["modules"])
    model = composer.merge_and_unload([0.5, 0.5, 0.0, 0.0])
    assert not model.get_output_embeddings()._forward_pre_hooks


def test_layers_that_cannot_merge_exactly_stay_unmerged(llama):
    """A half-precision base (PEFT keeps the adapters in float32) and a composer built under inference mode (its
    tensors keep no version counter, so a changed composition could not be told): unmerged, whatever the policy."""
    composer, tok = _composer(llama["base"], llama["modules"], dtype=torch.bfloat16, merge_into_weights="always")
    FewShotObjective(composer, tok, INPUTS, OUTPUTS)([0.3, 0.3, 0.3])
    assert composer.merged_layers() == 0
    with torch.inference_mode():  # such a composer only works under inference mode
        composer, tok = _composer(llama["base"], llama["modules"], merge_into_weights="always")
        objective = FewShotObjective(composer, tok, INPUTS, OUTPUTS)
        first = objective([0.3, -0.3, 0.3])
        assert composer.merged_layers() == 0
        objective([1.0, 1.0, 1.0])
        assert objective([0.3, -0.3, 0.3]) == first


def test_an_unknown_policy_is_refused_before_the_model_is_wrapped(world):
    base, _, _ = load_base_model(str(world["base"]), device="cpu")
    with pytest.raises(ValueError, match="unknown merge_into_weights 'sometimes'"):
        LoraComposer(base, lr.load_modules([str(world["hub"])]), merge_into_weights="sometimes")
    assert not hasattr(base, "peft_config")


def test_candidates_share_passes_in_groups_that_keep_a_pass_within_its_tokens(world):
    """evaluate_many: as many candidates per forward pass as keep it within ``shared_pass_rows`` tokens; a
    candidate alone in its group runs the single path (the very value of ``objective(w)``)."""
    from lorahub_ray.core.objective import SHARED_PASS_ROWS

    composer, tok = _composer(world["base"], world["modules"])
    objective = FewShotObjective(composer, tok, INPUTS, OUTPUTS)
    tokens = objective.batches[0]["input_ids"].numel()
    assert objective.group_size() == SHARED_PASS_ROWS // tokens
    rng = np.random.default_rng(7)
    candidates = [list(rng.uniform(-1.5, 1.5, 4)) for _ in range(5)]
    alone = [objective(w) for w in candidates]
    rows = []
    hook = composer.peft_model.get_base_model().register_forward_pre_hook(
        lambda _, args, kwargs: rows.append(len(kwargs["input_ids"])), with_kwargs=True)
    try:
        objective.shared_pass_rows = 2 * tokens + 1  # two candidates a pass
        values = objective.evaluate_many(candidates)
        assert rows == [2 * len(INPUTS), 2 * len(INPUTS), len(INPUTS)]
        # shared passes run unmerged, single steps on merged weights: equal up to the rounding of these modules'
        # large updates (see the test on float64 above)
        assert values == pytest.approx(alone, rel=1e-5, abs=1e-5)
        assert values[-1] == alone[-1]
        rows.clear()
        objective.shared_pass_rows = tokens - 1  # not even one: one candidate a pass
        assert objective.evaluate_many(candidates) == alone
        assert rows == [len(INPUTS)] * 5
    finally:
        hook.remove()
