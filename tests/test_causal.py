"""Decoder-only (causal LM) support: the family seam, the causal contract and its oracles (PEFT's own
``PeftModel`` loss, the reference formula on a causal PeftModel), left-padded generation, the whole
search on a tiny random Llama with grouped-query attention, templates, and the bad-input lines."""

import json
from pathlib import Path

import pytest
import torch

import lorahub_ray as lr
from helpers import EXAMPLES, LLAMA_TARGETS, make_llama_base, make_llama_module, write_jsonl
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
    assert abs(ours - objective.loss([1.0, 0.0, 0.0])) > 1e-3  # the weights matter


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
