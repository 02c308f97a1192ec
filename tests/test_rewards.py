"""Each reward on a real example, and the factory's composition."""

import pytest

from posttrain import rewards

SOLUTION = "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether in April and May.\n#### 72"
RIGHT = [{"role": "assistant", "content": "She sold 48/2 = 24 in May, so 48+24 = 72 in total.\n#### 72"}]
WRONG = "She sold 48*2 = 96 in May.\nThe answer is 144"


def one(name, **options):
    fns, weights = rewards.build({name: {"weight": 1.0, **options}})
    return fns[0]


def test_exact_match_and_format_on_chat_and_plain_completions():
    assert one("exact_match")([RIGHT, WRONG], answer=["72", "72"]) == [1.0, 0.0]
    assert one("format")([RIGHT, WRONG]) == [1.0, 0.0]
    assert one("length_penalty")(["", "x" * 400]) == [-1.0, 0.0]


def test_bleu_and_rouge_prefer_the_closer_solution():
    bleu, rouge = one("bleu"), one("rouge_l")
    same, close, far = SOLUTION, RIGHT[0]["content"], "bananas are yellow"
    b = bleu([same, close, far], solution=[SOLUTION] * 3)
    r = rouge([same, close, far], solution=[SOLUTION] * 3)
    assert b[0] == pytest.approx(1.0) and b[0] > b[1] > b[2]
    assert r[0] == pytest.approx(1.0) and r[0] > r[1] > r[2] == 0.0
    assert rewards.rouge_l("a b c d", "a x c d") == pytest.approx(0.75)


def test_cosine_similarity_on_minilm_embeddings():
    cosine = one("cosine")
    scores = cosine([RIGHT, "The weather in Paris is mild in spring."], solution=[SOLUTION] * 2)
    assert scores[0] > 0.6 > scores[1] and -1.0 <= scores[1] <= 1.0


def test_verifier_reward_reads_the_trained_reward_model(params, tmp_path):
    from tasks import reward_model
    from verifier_case import held_out_pairs, verifier_params, write_splits

    train, val, length = write_splits(tmp_path / "data")
    out = tmp_path / "rm"
    # Trained on whole texts, as the reward reads them (it truncates at 256 tokens, not at the stage's max_length)
    reward_model.run(verifier_params(params, length), train, val, out, checkpoint_dir=tmp_path / "ckpt")
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
