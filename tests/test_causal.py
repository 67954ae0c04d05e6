"""Decoder-only (causal LM) support: the family seam, the causal contract and its oracles (PEFT's own
``PeftModel`` loss, the reference formula on a causal PeftModel), left-padded generation, the whole
search on a tiny random Llama with grouped-query attention, templates, and the bad-input lines."""

import json
from pathlib import Path

import pytest
import torch

import lorahub_ray as lr
from helpers import EXAMPLES, LLAMA_TARGETS, make_llama_base, make_llama_module, write_jsonl
from lorahub_ray.api import evaluate_data
from lorahub_ray.core.compose import LoraComposer
from lorahub_ray.core.families import CAUSAL, SEQ2SEQ, family_of
from lorahub_ray.core.model import load_base_model
from lorahub_ray.core.objective import FewShotObjective
from lorahub_ray.evaluation.generate import generate

INPUTS = [e["input"] for e in EXAMPLES]
OUTPUTS = [e["output"] for e in EXAMPLES]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random Llama (GQA: 4 heads, 2 key/value heads), one with a chat template, three modules."""
    root = tmp_path_factory.mktemp("llama")
    base = make_llama_base(root / "base")
    chat = make_llama_base(root / "chat", chat=True)
    hub = root / "hub"
    modules = [make_llama_module(base, hub / name, seed=i + 1) for i, name in enumerate(["one", "two", "three"])]
    examples = write_jsonl(root / "fewshot.jsonl", EXAMPLES)
    return {"root": root, "base": base, "chat": chat, "hub": hub, "modules": modules, "examples": examples}


def _composer(llama):
    base, tok, _ = load_base_model(str(llama["base"]), device="cpu")
    return LoraComposer(base, [lr.load_module(str(p)) for p in llama["modules"]]), tok


def _contract_batch(tok, inputs, outputs):
    """The causal contract written out independently: input (with specials) + output (without) + EOS,
    the loss on output + EOS only, right-padded."""
    rows = []
    for x, y in zip(inputs, outputs):
        prompt = tok(x)["input_ids"]
        answer = tok(y, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(r[0]) for r in rows)
    ids = torch.tensor([r[0] + [tok.eos_token_id] * (width - len(r[0])) for r in rows])
    labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
    mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows])
    return ids, mask, labels


def _peft_loss(model, ids, mask, labels, form):
    """PEFT's / transformers' own loss: the model shifts the labels itself."""
    with torch.inference_mode():
        if form == "reference":  # one batch: token-mean CE / number of examples
            return float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) / len(ids)
        return sum(float(model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], labels=labels[i : i + 1]).loss)
                   for i in range(len(ids))) / len(ids)


def test_the_family_comes_from_the_config(llama, world):
    from transformers import AutoConfig, BertConfig

    assert family_of(AutoConfig.from_pretrained(llama["base"])) is CAUSAL
    assert family_of(AutoConfig.from_pretrained(world["base"])) is SEQ2SEQ
    with pytest.raises(lr.LoraHubError, match="bert model; LoraHub needs a seq2seq"):
        family_of(BertConfig())


def test_only_the_family_module_asks_which_kind_a_model_is():
    package = Path(lr.__file__).parent
    asking = sorted(str(p.relative_to(package)) for p in package.rglob("*.py") if "is_encoder_decoder" in p.read_text())
    assert asking == ["core/families.py"]


def test_loss_batches_follow_the_causal_contract(llama):
    _, tok = _composer(llama)
    assert tok.pad_token_id == tok.eos_token_id  # the tokenizer has no pad: EOS stands in
    batches = CAUSAL.loss_batches(tok, INPUTS, OUTPUTS, batch_size=None)
    ids, mask, labels = _contract_batch(tok, INPUTS, OUTPUTS)
    assert torch.equal(batches[0]["input_ids"], ids)
    assert torch.equal(batches[0]["attention_mask"], mask)
    assert torch.equal(batches[0]["labels"], labels)
    assert ids[0, 0] == tok.bos_token_id  # the input keeps its special tokens


@pytest.mark.parametrize("form", ["reference", "mean"])
@pytest.mark.parametrize("which", [0, 2])
def test_one_hot_weights_give_peft_models_own_loss(llama, form, which):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    composer, tok = _composer(llama)
    objective = FewShotObjective(composer, tok, INPUTS, OUTPUTS, loss=form)
    weights = [0.0] * 3
    weights[which] = 1.0
    ours = objective.loss(weights)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama["base"]), llama["modules"][which]).eval()
    theirs = _peft_loss(peft, *_contract_batch(tok, INPUTS, OUTPUTS), form)
    assert ours == pytest.approx(theirs, abs=1e-5)


@pytest.mark.parametrize("form,batch_size", [("reference", None), ("reference", 2), ("mean", 3)])
def test_mixed_weights_give_the_reference_formula_on_a_causal_peft_model(llama, form, batch_size):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    composer, tok = _composer(llama)
    objective = FewShotObjective(composer, tok, INPUTS, OUTPUTS, loss=form, batch_size=batch_size)
    weights = [0.7, -1.2, 0.4]
    ours = objective.loss(weights)
    states = [m.state_dict for m in composer.modules]
    summed = {k: sum(w * s[k] for w, s in zip(weights, states)) for k in states[0]}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(LLAMA_TARGETS), task_type="CAUSAL_LM", lora_dropout=0.0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(llama["base"]), config).eval()
    set_peft_model_state_dict(peft, summed)
    ids, mask, labels = _contract_batch(tok, INPUTS, OUTPUTS)
    size = batch_size or len(ids)
    with torch.inference_mode():
        if form == "reference":  # Σ over batches of the batch's token-mean CE / number of examples
            theirs = 0.0
            for s in range(0, len(ids), size):
                b = slice(s, s + size)
                width = int(mask[b].sum(1).max())  # each batch padded to its own longest row
                theirs += float(peft(input_ids=ids[b, :width], attention_mask=mask[b, :width],
                                     labels=labels[b, :width]).loss)
            theirs /= len(ids)
        else:
            theirs = _peft_loss(peft, ids, mask, labels, "mean")
    assert ours == pytest.approx(theirs, abs=1e-5)
    # the weights matter: the loss surface is not flat, and the mixed loss is none of the trivial answers (the
    # base, one module alone); a fixed gap to one of them failed where another CPU drew other random modules
    trivial = [objective.loss(w) for w in ([0.0] * 3, [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0])]
    assert max(trivial) - min(trivial) > 1e-3
    assert min(abs(ours - t) for t in trivial) > 1e-5


def test_candidates_sharing_a_forward_pass_get_their_own_loss(llama):
    composer, tok = _composer(llama)
    objective = FewShotObjective(composer, tok, INPUTS, OUTPUTS, loss="mean", batch_size=2)
    candidates = [[0.5, 0.1, -0.3], [-1.0, 0.9, 0.2], [0.0, 0.0, 1.4]]
    together = objective.losses(candidates)
    alone = [objective.loss(w) for w in candidates]
    assert together == pytest.approx(alone, rel=1e-5)


def test_left_padded_batched_generation_equals_one_at_a_time(llama):
    composer, tok = _composer(llama)
    composer.compose([0.8, -0.5, 0.3])
    prompts = ["a", "reverse: hello world", "xyz", "reverse: a much longer input than the others"]
    batched = generate(composer.model, tok, prompts, batch_size=4, max_new_tokens=8)
    alone = [generate(composer.model, tok, [p], batch_size=1, max_new_tokens=8)[0] for p in prompts]
    assert batched == alone
    assert all(b for b in batched)  # a random model says something
    # only the new tokens come back: the same text as the model's own continuation, cut after the prompt
    ids = tok(prompts[1], return_tensors="pt")
    with torch.inference_mode():
        full = composer.model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    new = full[0, ids["input_ids"].shape[1]:].tolist()
    new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    assert alone[1] == tok.decode(new, skip_special_tokens=True)


def test_generation_stops_at_eos(llama):
    """A head that always says EOS first: nothing comes back, neither the EOS nor what follows it."""
    composer, tok = _composer(llama)
    base = composer.model.get_base_model()
    head = torch.nn.Linear(base.config.hidden_size, base.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 10.0
    base.lm_head = head
    assert generate(composer.model, tok, ["abc", "a longer prompt"], max_new_tokens=5) == ["", ""]


# --- the whole search, templates, bad input --------------------------------------------------------


def test_search_writes_a_merged_model_equal_to_the_composition_and_the_recipe_rebuilds_it(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    result = lr.lorahub_learning(str(llama["base"]), [str(llama["hub"])], str(llama["examples"]), output=out,
                                 budget=6, progress=False, merge=True)
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["template"] == "plain" and len(recipe["weights"]) == 3
    composer, tok = _composer(llama)
    names = [m.name for m in composer.modules]
    composer.compose([result.weights[n] for n in names])
    ids = tok(INPUTS, return_tensors="pt", padding=True)
    merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    rebuilt, _ = lr.build_model(out, device="cpu")
    with torch.inference_mode():
        want = composer.model(**ids).logits
        torch.testing.assert_close(merged(**ids).logits, want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(rebuilt(**ids).logits, want, atol=1e-5, rtol=1e-4)
    metrics = lr.evaluate(out, str(llama["examples"]), progress=False, max_new_tokens=6)
    assert metrics["examples"] == 5


def test_a_causal_adapter_on_a_seq2seq_base_names_the_file(llama, world):
    causal = lr.load_module(str(llama["modules"][0]))
    base, _, _ = load_base_model(str(world["base"]), device="cpu")
    with pytest.raises(lr.IncompatibleModulesError) as info:
        LoraComposer(base, [causal])
    message = str(info.value)
    assert "\n" not in message and str(llama["modules"][0] / "adapter_config.json") in message
    assert "CAUSAL_LM adapter" in message and "seq2seq" in message


def test_a_seq2seq_adapter_on_a_causal_base_names_the_file(llama, world):
    t5 = lr.load_module(str(world["modules"][0]))
    base, _, _ = load_base_model(str(llama["base"]), device="cpu")
    with pytest.raises(lr.IncompatibleModulesError) as info:
        LoraComposer(base, [t5])
    message = str(info.value)
    assert "\n" not in message and str(world["modules"][0] / "adapter_config.json") in message
    assert "SEQ_2_SEQ_LM adapter" in message and "causal" in message


def test_a_chat_template_is_searched_with_recorded_and_applied_by_evaluate(llama, tmp_path):
    from lorahub_ray.core.families import render

    modules = [make_llama_module(llama["chat"], tmp_path / "hub" / n, seed=i) for i, n in enumerate(["a", "b"])]
    out = tmp_path / "run"
    lr.lorahub_learning(str(llama["chat"]), [str(tmp_path / "hub")], str(llama["examples"]), output=out, budget=4,
                        template="chat", progress=False)
    assert json.loads((out / "recipe.json").read_text())["template"] == "chat"
    evaluated = evaluate_data(out, str(llama["examples"]), progress=False, max_new_tokens=6)
    model, tok = lr.load_model(out, device="cpu")
    assert render(tok, ["hi"], "chat") == ["<|user|>hi</s><|assistant|>"]
    by_input = dict(zip(evaluated.predictions["input"], evaluated.predictions["prediction"]))
    chat = generate(model, tok, INPUTS, max_new_tokens=6, template="chat")
    assert [by_input[x] for x in INPUTS] == chat
    plain = evaluate_data(out, str(llama["examples"]), progress=False, max_new_tokens=6, template="plain")
    assert plain.metrics["input_tokens_per_example"] < evaluated.metrics["input_tokens_per_example"]
    assert len(modules) == 2


def test_chat_template_without_one_in_the_tokenizer_is_one_clear_error(llama, tmp_path):
    with pytest.raises(lr.LoraHubError, match="has no chat template"):
        lr.lorahub_learning(str(llama["base"]), [str(llama["hub"])], str(llama["examples"]), budget=2,
                            template="chat", progress=False)


def test_a_gguf_file_that_is_not_a_model_is_one_clear_line(tmp_path):
    fake = tmp_path / "notes.gguf"
    fake.write_text("hello")
    with pytest.raises(lr.LoraHubError, match="not a GGUF file") as info:
        load_base_model(str(fake), device="cpu")
    assert "\n" not in str(info.value) and str(fake) in str(info.value)
    gguf = pytest.importorskip("gguf")
    empty = tmp_path / "empty.gguf"
    writer = gguf.GGUFWriter(str(empty), "nothing")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(lr.LoraHubError, match="not a GGUF model") as info:
        load_base_model(str(empty), device="cpu")
    assert "\n" not in str(info.value) and str(empty) in str(info.value)


# --- training a module -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["causal", "seq2seq"])
def test_train_writes_an_adapter_load_modules_accepts_that_lowers_the_loss(llama, world, tmp_path, family):
    from lorahub_ray.core.train import train_module
    from lorahub_ray.io import catalogue

    base = llama["base"] if family == "causal" else world["base"]
    hub = tmp_path / "hub.parquet"
    result = train_module(str(base), str(llama["examples"]), tmp_path / "mod", rank=4, steps=15, lr=2e-2,
                          batch_size=4, seed=1, hub=str(hub), task="reverse", progress=False)
    cfg = json.loads((tmp_path / "mod" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base) and (tmp_path / "mod" / "adapter_model.safetensors").is_file()
    assert cfg["task_type"] == ("CAUSAL_LM" if family == "causal" else "SEQ_2_SEQ_LM")
    module = lr.load_modules([str(tmp_path / "mod")])[0]
    rows = catalogue.read_catalogue(hub)
    assert [(r["id"], r["task"], r["sha256"]) for r in rows] == [("mod", "reverse", module.sha256)]
    base_model, tok, _ = load_base_model(str(base), device="cpu")
    objective = FewShotObjective(LoraComposer(base_model, [module]), tok, INPUTS, OUTPUTS, loss="mean")
    assert objective.loss([1.0]) < objective.loss([0.0]) - 0.1  # trained on these examples: a lower loss
    assert result.losses[-1] < result.losses[0]


def test_cli_train_options_and_a_taken_hub_id_fails_before_training(llama, tmp_path):
    from typer.testing import CliRunner

    from lorahub_ray.cli import app

    hub = tmp_path / "hub.parquet"
    args = ["train", "-m", str(llama["base"]), "-d", str(llama["examples"]), "--rank", "2", "--alpha", "4",
            "--targets", "q_proj,k_proj,o_proj", "--steps", "2", "--lr", "0.01", "--batch-size", "2", "--seed", "3",
            "--hub", str(hub)]
    done = CliRunner().invoke(app, args + ["-o", str(tmp_path / "m")])
    assert done.exit_code == 0, done.output
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], sorted(cfg["target_modules"])) == (2, 4, ["k_proj", "o_proj", "q_proj"])
    (tmp_path / "other").mkdir()
    taken = CliRunner().invoke(app, args + ["-o", str(tmp_path / "other" / "m")])
    assert taken.exit_code == 2 and "already holds a module 'm'" in taken.output
    assert not (tmp_path / "other" / "m").exists()


# --- serving ---------------------------------------------------------------------------------------


def test_the_model_host_serves_causal_recipes_merged_and_composed_each_with_its_template(llama, tmp_path):
    from lorahub_ray.serving.host import ModelHost

    hub = tmp_path / "hub"
    for i, n in enumerate(["a", "b", "c"]):
        make_llama_module(llama["chat"], hub / n, seed=10 + i)
    runs = {}
    for template in ("plain", "chat"):
        runs[template] = tmp_path / template
        lr.lorahub_learning(str(llama["chat"]), [str(hub)], str(llama["examples"]), output=runs[template], budget=3,
                            seed=7 if template == "plain" else 8, template=template, progress=False)
    specs = [f"{t}={p}" for t, p in runs.items()]
    composed = ModelHost(specs, mode="composed", device="cpu")
    merged = ModelHost(specs, mode="merged", device="cpu")
    for template, path in runs.items():
        model, tok = lr.load_model(path, device="cpu")
        want = generate(model, tok, INPUTS, max_new_tokens=6, template=template)
        assert composed.generate(template, INPUTS, max_new_tokens=6) == want
        assert merged.generate(template, INPUTS, max_new_tokens=6) == want
    assert {d["id"]: d["template"] for d in composed.describe()} == {"plain": "plain", "chat": "chat"}


def test_a_search_with_adapters_of_the_other_family_fails_before_the_base_model_loads(llama, world, monkeypatch):
    from lorahub_ray.core import families

    def no_loading(*args, **kwargs):
        raise AssertionError("the base model's weights were loaded")

    monkeypatch.setattr(families.CausalFamily, "load", no_loading)
    with pytest.raises(lr.IncompatibleModulesError, match="SEQ_2_SEQ_LM adapter.*causal model"):
        lr.lorahub_learning(str(llama["base"]), [str(world["hub"])], str(llama["examples"]), budget=2, progress=False)


# --- the Ray layers ----------------------------------------------------------------------------------


def test_ray_search_and_ray_data_evaluation_of_a_causal_lm_with_a_chat_template(llama, ray_cluster, tmp_path):
    """One evaluator actor on Ray Tune equals the local search (same template), and the recipe's chat
    template is applied by the sharded Ray Data evaluation exactly as in process."""
    from lorahub_ray.cluster.ray_search import lorahub_learning_ray

    hub = tmp_path / "hub"
    for i, n in enumerate(["a", "b", "c"]):
        make_llama_module(llama["chat"], hub / n, seed=20 + i)
    local = lr.lorahub_learning(str(llama["chat"]), [str(hub)], str(llama["examples"]), budget=5, template="chat",
                                progress=False)
    remote = lorahub_learning_ray(str(llama["chat"]), [str(hub)], str(llama["examples"]), output=tmp_path / "run",
                                  workers=1, budget=5, template="chat", progress=False)
    assert remote.recipe.template == "chat"
    assert remote.recipe.weights == pytest.approx(local.recipe.weights, abs=1e-6)
    assert remote.recipe.objective == pytest.approx(local.recipe.objective, abs=1e-6)
    in_process = evaluate_data(tmp_path / "run", str(llama["examples"]), batch_size=2, max_new_tokens=5, progress=False)
    sharded = evaluate_data(str(tmp_path / "run"), str(llama["examples"]), workers=1, batch_size=2, max_new_tokens=5,
                            progress=False)
    assert sharded.predictions == in_process.predictions
    assert sharded.metrics["template"] == in_process.metrics["template"] == "chat"
