"""tabletop-tiny's LMM: tokenizer, processor, Hugging Face save/reload, packing, training step, CLI."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from flmm_ros.tabletop.attention_check import attention_report, phrase_attention
from flmm_ros.tabletop.language import DESCRIBE_PROMPT, QAPair
from flmm_ros.tabletop.lmm import TinyLlavaArch, arch_of, build_model, build_processor, load_tabletop_lmm, save_tabletop_lmm
from flmm_ros.tabletop.packing import collate, pack
from flmm_ros.tabletop.patch_probe import TiedPatchProbe, patch_targets
from flmm_ros.tabletop.scenes import generate_scene
from flmm_ros.tabletop.tokenizer import IMAGE, build_tokenizer, format_prompt
from flmm_ros.tabletop.train_lmm import (CHECKPOINT_FILES, QUESTION_WEIGHTS, _tied_probe, main as train_main,
                                        parse_question_weights, pick_balanced, train_batch, training_turns)

ARCH = TinyLlavaArch(image_size=64, patch_size=16, vision_hidden=32, vision_intermediate=64, vision_layers=1,
                     vision_heads=2, text_hidden=32, text_intermediate=64, text_layers=2, text_heads=2,
                     text_kv_heads=1, max_positions=256)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models run faster on one thread, much faster on a busy machine (no thread sync)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def processor():
    return build_processor(ARCH)


@pytest.fixture(scope="module")
def model(processor):
    return build_model(ARCH, processor.tokenizer, seed=0).eval()


def test_tokenizer_round_trips_every_scene_sentence():
    tok = build_tokenizer()
    for seed in range(40):
        scene = generate_scene(seed, (96, 128))
        texts = [t for q in scene.questions for t in (q.question, q.answer)] + [o.answer for o in scene.objects]
        for text in texts:
            ids = tok(text, add_special_tokens=False).input_ids
            assert tok.unk_token_id not in ids, text
            assert tok.decode(ids) == text.lower()
    for instruction in ["pick up the red mug", "put the apple in the bowl", "grab the ball next to the box please",
                        "<image>\nPlease give me a description of the image."]:
        assert tok.unk_token_id not in tok(instruction).input_ids, instruction


def test_tokenizer_special_tokens_and_chat_template():
    tok = build_tokenizer()
    ids = tok("USER: <image>\nwhat colour is the mug? ASSISTANT:").input_ids
    assert ids[0] == tok.bos_token_id
    assert ids.count(tok.convert_tokens_to_ids(IMAGE)) == 1
    assert tok.convert_ids_to_tokens(ids)[1:4] == ["user", ":", IMAGE]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the mug?"}]}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == format_prompt("what colour is the mug?") == "USER: <image>\nwhat colour is the mug? ASSISTANT:"
    messages.append({"role": "assistant", "content": [{"type": "text", "text": "red"}]})
    assert tok.apply_chat_template(messages, tokenize=False) == format_prompt("what colour is the mug?", "red")


def test_processor_expands_the_image_token_and_pads_to_square(processor):
    image = generate_scene(1, (120, 160)).image
    out = processor(text=format_prompt("is there a mug?"), images=image, return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE)
    assert int((out.input_ids == image_id).sum()) == ARCH.image_tokens == 16
    assert tuple(out.pixel_values.shape) == (1, 3, 64, 64)
    # Padded top rows hold the CLIP mean colour, which normalises to ~0.
    assert out.pixel_values[0, :, 0, :].abs().max() < 0.02
    assert out.pixel_values[0, :, 32, :].abs().max() > 0.1


def test_saved_model_reloads_with_from_pretrained_and_same_logits(processor, model, tmp_path):
    save_tabletop_lmm(model, processor, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)

    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path, local_files_only=True).eval()
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path, local_files_only=True)) is type(reloaded)
    auto_processor = AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    auto_tokenizer = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = format_prompt("what colour is the red mug?", "red")
    assert auto_tokenizer(text).input_ids == processor.tokenizer(text).input_ids
    image = generate_scene(2, (96, 128)).image
    inputs = auto_processor(text=text, images=image, return_tensors="pt")
    expected = processor(text=text, images=image, return_tensors="pt")
    assert torch.equal(inputs.input_ids, expected.input_ids)
    assert torch.allclose(inputs.pixel_values, expected.pixel_values)
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, model(**expected).logits, atol=1e-5)
    loaded_model, _ = load_tabletop_lmm(tmp_path)
    assert arch_of(loaded_model) == ARCH and loaded_model.config.image_seq_length == ARCH.image_tokens
    with pytest.raises(FileNotFoundError):
        load_tabletop_lmm(tmp_path / "missing")


def test_packed_turns_compute_what_single_turns_compute(processor, model):
    scene = generate_scene(5, (96, 128))
    turns = [(q.question, q.answer) for q in scene.questions[:3]]
    seq = pack(processor.tokenizer, ARCH.image_tokens, turns)
    batch = collate([seq], processor.tokenizer.pad_token_id)
    batch.pop("labels")
    batch["pixel_values"] = processor.image_processor([scene.image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        packed = model(**batch).logits[0]
        prefix = [i for i, s in enumerate(seq.segment) if s == -1]
        for k, (question, answer) in enumerate(turns):
            single = processor(text=format_prompt(question, answer), images=scene.image, return_tensors="pt")
            rows = [i for i, s in enumerate(seq.segment) if s == k]
            assert [seq.input_ids[i] for i in prefix + rows] == single.input_ids[0].tolist()
            assert torch.allclose(packed[rows], model(**single).logits[0, len(prefix):], atol=1e-5)
            start, end = seq.answer_spans[k]
            assert processor.tokenizer.decode([seq.labels[i] for i in range(start, end)],
                                              skip_special_tokens=True) == answer.lower()


def test_teacher_forced_argmax_is_the_greedy_answer(processor, model):
    """The accuracy check in train_lmm.evaluate reads logits at answer positions - 1."""
    image = generate_scene(4, (96, 128)).image
    question = "what colour is the mug?"
    inputs = processor(text=format_prompt(question), images=image, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new = generated[0, inputs.input_ids.shape[1]:].tolist()
    seq = pack(processor.tokenizer, ARCH.image_tokens, [(question, "")])
    start = seq.answer_spans[0][0]
    forced = seq.input_ids[:start] + new
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([forced]), pixel_values=inputs.pixel_values).logits[0]
    assert logits[start - 1:start - 1 + len(new)].argmax(-1).tolist() == new


def test_training_steps_reduce_the_loss(processor):
    model = build_model(ARCH, processor.tokenizer, seed=1).train()
    scenes = [generate_scene(s, (96, 128)) for s in range(4)]
    seqs = [pack(processor.tokenizer, ARCH.image_tokens, [(q.question, q.answer) for q in s.questions[:4]])
            for s in scenes]
    batch = collate(seqs, processor.tokenizer.pad_token_id)
    batch["pixel_values"] = processor.image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0] and losses == sorted(losses, reverse=True), losses


def test_patch_targets_label_the_object_patches():
    scene = generate_scene(7, (240, 320))
    targets = patch_targets(scene, 12)
    assert targets.shape == (144, 2)
    assert set(np.unique(targets[:, 0])) - {0} <= {i + 1 for i in range(6)}
    # The image is 4:3, so the padded top and bottom bands (40 px of 320 -> 1.5 patches) are empty.
    assert (targets.reshape(12, 12, 2)[0] == 0).all() and (targets.reshape(12, 12, 2)[-1] == 0).all()
    assert (targets[:, 0] > 0).sum() >= len(scene.objects)


def test_tied_probe_scores_patches_by_word_embeddings_and_trains_them(processor):
    model = build_model(ARCH, processor.tokenizer, seed=3)
    probe = _tied_probe(model, processor)
    embeddings = model.get_input_embeddings().weight
    # The model owns the word embeddings: the probe's own parameters are only background, bias and scale.
    assert {name for name, _ in probe.named_parameters()} == {"background", "bias", "scale"}
    mug, red = (processor.tokenizer.convert_tokens_to_ids(w) for w in ("mug", "red"))
    targets = torch.zeros(1, 3, 2, dtype=torch.long)
    targets[0, 0] = torch.tensor([probe.kind_ids.tolist().index(mug) + 1, probe.colour_ids.tolist().index(red) + 1])
    # A patch that is the "mug" embedding plus the "red" embedding, scaled up, is scored as a red mug.
    patch = 20 * (embeddings[mug] + embeddings[red]).detach()
    tokens = torch.stack([patch, torch.zeros_like(patch), torch.zeros_like(patch)])[None]
    with torch.no_grad():
        probe.bias.fill_(-1e4)   # nothing is background here
        aligned = probe.loss(tokens, targets).item()
        swapped = probe.loss(tokens.flip(-1), targets).item()
        probe.bias.zero_()
    assert aligned < swapped
    probe.loss(tokens, targets).backward()
    assert embeddings.grad is not None and embeddings.grad[mug].abs().sum() > 0


def test_tied_probe_needs_every_kind_and_colour_as_a_word(processor):
    class NoSceneWords:   # a tokenizer whose vocabulary lacks the scene words
        unk_token_id = processor.tokenizer.unk_token_id

        def convert_tokens_to_ids(self, tokens):
            return [self.unk_token_id] * len(tokens)

    model = build_model(ARCH, processor.tokenizer, seed=3)
    with pytest.raises(ValueError, match="kind or colour word"):
        _tied_probe(model, SimpleNamespace(tokenizer=NoSceneWords()))


SMALL = ["--image-size", "64", "--patch-size", "16", "--vision-hidden", "32", "--vision-layers", "1",
         "--text-hidden", "32", "--text-intermediate", "64", "--text-layers", "1", "--heads", "2",
         "--kv-heads", "1", "--batch-size", "2", "--questions", "2", "--eval-scenes", "2", "--eval-every", "2",
         "--save-every", "1", "--warmup", "1", "--threads", "1"]


def test_cli_trains_resumes_saves_and_evaluates(tmp_path, capsys):
    train_main(["--out", str(tmp_path), "--steps", "2", *SMALL])
    # The checkpoint is safetensors and JSON only (nothing pickled), no half-written file left.
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == sorted(CHECKPOINT_FILES)
    train_main(["--out", str(tmp_path), "--steps", "3", *SMALL])
    assert "resuming from step 2" in capsys.readouterr().out
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and "val" in log[1]
    assert (tmp_path / "model" / "model.safetensors").is_file()
    train_main(["--out", str(tmp_path), "--eval", "--eval-scenes", "2", "--show", "1", "--threads", "1"])
    report = capsys.readouterr().out
    assert '"colour"' in report and "reference" in report

    # A second stage starts from the saved model (its arch, not the command line's) with another question mix
    # (and here the tied probe).
    stage2 = tmp_path / "stage2"
    stage2.mkdir()
    train_main(["--out", str(stage2), "--init", str(tmp_path / "model"), "--steps", "1", "--batch-size", "2",
                "--questions", "2", "--eval-scenes", "2", "--warmup", "1", "--threads", "1", "--lr", "0",
                "--question-weights", "colour=1", "--refer-prob", "1", "--tied-probe"])
    first, _ = load_tabletop_lmm(tmp_path / "model")
    second, _ = load_tabletop_lmm(stage2 / "model")
    assert arch_of(second) == arch_of(first)
    # lr 0: AdamW's weight decay is scaled by lr too, so the weights are the first stage's exactly.
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_pickled_optimizer_state_is_refused_with_a_restart_hint(tmp_path):
    """Checkpoints from before the shared toolkit kept the optimizer as a torch pickle: never unpickled now."""
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "state.json").write_text(json.dumps({"step": 1}))
    (checkpoint / "optimizer.pt").write_bytes(b"not read")
    with pytest.raises(SystemExit, match=r"^error: .* pickled optimizer state \(optimizer\.pt\).* --restart"):
        train_main(["--out", str(tmp_path), "--steps", "2", *SMALL])


def test_phrase_attention_maps_and_report(processor, tmp_path):
    model = build_model(ARCH, processor.tokenizer, seed=2)
    save_tabletop_lmm(model, processor, tmp_path)
    eager, _ = load_tabletop_lmm(tmp_path, attn_implementation="eager")
    sdpa, _ = load_tabletop_lmm(tmp_path)
    image = generate_scene(3, (96, 128)).image
    maps = phrase_attention(sdpa, processor, image, "the red mug")
    assert maps.shape == (ARCH.text_layers * ARCH.text_heads, ARCH.image_tokens)
    assert torch.allclose(maps.sum(-1), torch.ones(len(maps)), atol=1e-5)
    # Channel l*H + h is layer l's head h, read from the model's own attention output.
    prompt = processor(text=format_prompt(DESCRIBE_PROMPT), images=image, return_tensors="pt")
    ids = torch.cat([prompt.input_ids, processor.tokenizer("the red mug", add_special_tokens=False,
                                                           return_tensors="pt").input_ids], 1)
    with torch.no_grad():
        att = eager(input_ids=ids, pixel_values=prompt.pixel_values, output_attentions=True).attentions
    image_cols = (ids[0] == processor.tokenizer.convert_tokens_to_ids(IMAGE)).nonzero().squeeze(1)
    last_head = att[1][0, 1, -3:][:, image_cols].mean(0)
    assert torch.allclose(maps[1 * ARCH.text_heads + 1], last_head / last_head.sum(), atol=1e-6)

    report = attention_report(sdpa, processor, scenes=6)
    assert report["objects"] > 0 and 0 <= report["pointing_mean_map"] <= 1 and report["lift_mean_map"] > 0
    assert report["kind_tests"] > 0 and report["colour_tests"] > 0
    for test in ("kind", "colour"):
        assert 0 < report[f"{test}_share_mean_map"] < 1 and 0 < report[f"{test}_share_best_head"] < 1


def test_questions_are_drawn_answer_balanced():
    qas = [QAPair(f"is there a {k}?", "no", "presence") for k in "abcdefghi"] + [QAPair("is there a mug?", "yes", "presence")]
    rng = np.random.default_rng(0)
    picks = [pick_balanced(qas, rng).answer for _ in range(400)]
    assert 0.4 < picks.count("yes") / len(picks) < 0.6


def test_question_weights_pick_the_question_mix():
    assert parse_question_weights("") == QUESTION_WEIGHTS
    weights = parse_question_weights("colour=0.7,presence=0.3")
    assert weights["colour"] == 0.7 and weights["presence"] == 0.3 and weights["count"] == 0
    with pytest.raises(ValueError, match="unknown question type 'size'"):
        parse_question_weights("size=1")
    with pytest.raises(ValueError, match="sum to zero"):
        parse_question_weights("colour=0")
    with pytest.raises(ValueError, match="'colour' is not TYPE=NUMBER"):
        parse_question_weights("colour,presence=1")
    scene = generate_scene(5, (96, 128))
    turns = training_turns(scene, np.random.default_rng(0), 6, weights, refer_prob=1.0)
    questions = {q.question: q.type for q in scene.questions}
    assert turns[0] == (DESCRIBE_PROMPT, scene.description)
    assert turns[1][0] == DESCRIBE_PROMPT       # the referring turn, always with refer_prob 1
    assert {questions[q] for q, _ in turns[2:]} <= {"colour", "presence"} and len(turns) == 8


def test_few_colour_batches_have_at_most_two_colours_per_scene(processor):
    _, targets = train_batch(0, 6, 0, 2, processor, ARCH.image_tokens, few_colours_prob=1.0)
    colours_per_scene = [len(set(t[:, 1].tolist()) - {0}) for t in targets]
    assert max(colours_per_scene) <= 2 and max(colours_per_scene) >= 1
    _, default = train_batch(0, 6, 0, 2, processor, ARCH.image_tokens)
    assert default.shape == targets.shape


def test_model_card_tables_by_case_and_attention():
    from flmm_ros.tabletop.model_card import attention_table, case_table

    scores = {"coarse": {"ciou": 0.5, "count": 3}, "refined": {"ciou": 0.6, "count": 3},
              "coarse | unique colour and kind": {"ciou": 0.7, "count": 2},
              "refined | unique colour and kind": {"ciou": 0.8, "count": 2},
              "coarse | another object of its colour": {"ciou": 0.3, "count": 1},
              "refined | another object of its colour": {"ciou": 0.4, "count": 1}}
    rows = case_table(scores).splitlines()[2:]
    assert rows == ["| unique colour and kind | 2 | 0.700 | 0.800 |", "| another object of its colour | 1 | 0.300 | 0.400 |"]
    report = {"kind_tests": 5, "kind_share_mean_map": 0.47, "kind_share_best_head": 0.48,
              "colour_tests": 4, "colour_share_mean_map": 0.58, "colour_share_best_head": 0.97}
    rows = attention_table(report).splitlines()[2:]
    assert rows == ["| an object of the same colour, another kind | 5 | 0.470 | 0.480 |",
                    "| an object of the same kind, another colour | 4 | 0.580 | 0.970 |"]
