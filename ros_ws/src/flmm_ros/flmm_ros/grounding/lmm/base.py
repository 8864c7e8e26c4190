"""The frozen-LMM adapter interface, and everything about it that is the same for every family.

An adapter owns one Hugging Face model (frozen, eval mode) and knows three family-specific things:
how the image is preprocessed, how image features are computed, and how a row of attention over the
image tokens becomes 2D maps. Everything else lives here: prompts, the per-frame KV cache of the
image prefix, the teacher-forced phrase pass (F-LMM) and greedy answering.

Per frame, `encode_frame` runs the vision tower and the LMM over `<bos>USER: <image...>` once and keeps
that KV cache. Every later pass (grounding or answering) feeds only the text after the image tokens
and crops the cache back afterwards, so the prefix is never recomputed.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoTokenizer, DynamicCache

from ..attention import capture_phrase_attention, enable_phrase_attention, merge_mean, side_by_side
from ..devices import ids_tensor, to_device
from ..quantization import load_kwargs as quantization_load_kwargs
from ..types import GroundingError
from .passes import LMMFrame, PhrasePass, PreparedImage, ReasoningPass, ScoredAnswer
from .prompts import GROUNDING_PROMPT, PROMPT_TEMPLATES, template_for


class LMMAdapter(ABC):
    """Base class: subclasses implement the four family-specific methods at the bottom."""

    def __init__(self, model, tokenizer, image_processor=None, template: str = "vicuna"):
        if template not in PROMPT_TEMPLATES and "{input}" not in template:
            raise GroundingError(f"unknown prompt template {template!r}: use {sorted(PROMPT_TEMPLATES)} "
                                 "or a format string containing {input}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = PROMPT_TEMPLATES.get(template, template)
        self.image_token_id = model.config.image_token_id
        text = model.config.text_config
        self.num_layers = text.num_hidden_layers
        self.num_heads = text.num_attention_heads
        self.hidden_size = text.hidden_size
        self.language_model = model.model.language_model
        self.embed_tokens = model.get_input_embeddings()
        self._token_ids: dict[tuple[str, bool], tuple[int, ...]] = {}   # _tokenize's memory
        enable_phrase_attention(model)

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                        template: str | None = None, quantization: str = "none", **model_kwargs):
        """The adapter over the model at `path`; `quantization` ('none', 'int8', 'int4') quantizes the language
        model's linear weights while loading (quantization.py)."""
        if quantization != "none":
            from transformers import AutoConfig
            text_config = AutoConfig.from_pretrained(path).text_config
            model_kwargs.update(quantization_load_kwargs(quantization, device, dtype, text_config))
        model = cls.model_class.from_pretrained(path, dtype=dtype, **model_kwargs)
        if "device_map" not in model_kwargs:   # a device_map has placed every weight already
            model = model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        try:
            # PIL backend: F-LMM ran transformers 4.39, whose processors resample with PIL.
            image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
        except (OSError, ValueError):
            image_processor = None   # fall back to CLIP statistics
        return cls(model, tokenizer, image_processor, template or template_for(model, tokenizer))

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def mask_head_channels(self) -> int:
        return self.num_layers * self.num_heads

    # ---- prompts ---------------------------------------------------------------------------
    def prompt_ids(self, text: str, num_image_tokens: int, answer_prefix: str = "") -> list[int]:
        """`<bos>` + template(`<image>\\n{text}`) + answer_prefix, with the image token expanded to every image
        feature. The prefix is appended to the prompt string before tokenising, as F-LMM's reason_seg does
        (so "ASSISTANT:It is" gives the token `It`, not `▁It`)."""
        prompt = self.template.format(input="<image>\n" + text) + answer_prefix
        ids = self._tokenize(prompt, special=True)
        if ids.count(self.image_token_id) != 1:
            raise GroundingError("the tokenizer does not map '<image>' to the model's image token")
        i = ids.index(self.image_token_id)
        return ids[:i] + [self.image_token_id] * num_image_tokens + ids[i + 1:]

    def text_ids(self, text: str) -> list[int]:
        return self._tokenize(text, special=False)

    def _tokenize(self, text: str, special: bool) -> list[int]:
        """The tokenizer's ids of `text`, remembered: every instruction tokenises the same grounding prompt, '.' and
        presence questions again, ~0.1 ms a call. Bounded: cleared when it holds 1024 texts."""
        ids = self._token_ids.get((text, special))
        if ids is None:
            if len(self._token_ids) >= 1024:
                self._token_ids.clear()
            ids = self._token_ids[text, special] = tuple(self.tokenizer(text, add_special_tokens=special).input_ids)
        return list(ids)

    # ---- per frame ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode_frame(self, image: np.ndarray, stage: Callable[[str], contextlib.AbstractContextManager] | None = None,
                     defer_prefix: bool = False) -> LMMFrame:
        """Vision tower, then the LMM over the image prefix; `stage(name)` may time "vision" and "lmm_prefix".
        `defer_prefix` leaves the prefix to the frame's first pass: a phrase pass then runs it in its own forward
        (one forward fewer per new frame), any other pass runs it first."""
        stage = stage or (lambda _name: contextlib.nullcontext())
        with stage("vision"):
            prepared = self.prepare_image(image)
            features = self.image_features(prepared).to(self.dtype)     # (n_image, d)
        ids = self.prompt_ids(GROUNDING_PROMPT, features.shape[0])
        prefix_ids = ids[:len(ids) - ids[::-1].index(self.image_token_id)]
        # Image positions from the id list, not from a device mask: no GPU round trip.
        image_keys = to_device(torch.tensor([i for i, t in enumerate(prefix_ids) if t == self.image_token_id]),
                               self.device)
        frame = LMMFrame(prepared, prefix_ids, image_keys, None, features)
        if not defer_prefix:
            with stage("lmm_prefix"):
                self._fill_prefix(frame)
        return frame

    @torch.no_grad()
    def _fill_prefix(self, frame: LMMFrame) -> None:
        """Run a deferred prefix into the frame's KV cache (nothing when it is there)."""
        if frame.cache is None:
            self._run_on_cache(frame, [])

    def separator_id(self) -> int:
        """The '.' closing each phrase: the last token of encode('.'), as F-LMM's RefCOCO2PNG takes it."""
        return self.text_ids(".")[-1]

    def _text_ids(self, frame: LMMFrame, prompt_text: str, answer_prefix: str = "") -> list[int]:
        """The prompt's token ids after the frame's prefix."""
        ids = self.prompt_ids(prompt_text, len(frame.image_keys), answer_prefix)
        n = len(frame.prefix_ids)
        if ids[:n] != frame.prefix_ids:
            raise RuntimeError("prompt prefix changed between frame encoding and use")
        return ids[n:]

    def _continuation(self, frame: LMMFrame, prompt_text: str, answer_prefix: str = "") -> list[int]:
        """`_text_ids`, with the frame's prefix in its cache (the passes that extend the cache step by step)."""
        self._fill_prefix(frame)
        return self._text_ids(frame, prompt_text, answer_prefix)

    def _run_on_cache(self, frame: LMMFrame, ids: list[int], **kwargs):
        """Forward `ids` after the frame's prefix; the cache holds just the prefix afterwards. A deferred prefix
        runs in the same forward, first: the outputs then cover prefix + ids (`_deferred(frame)` rows more)."""
        deferred = frame.cache is None
        embeds = self.embed_tokens(ids_tensor((frame.prefix_ids if deferred else []) + ids, self.device))
        if deferred:
            embeds[0, frame.image_keys] = frame.features
            frame.cache = DynamicCache(config=self.model.config.text_config)
        try:
            out = self.language_model(inputs_embeds=embeds, past_key_values=frame.cache, use_cache=True, **kwargs)
        except BaseException:
            if deferred:
                frame.cache = None                 # still deferred: the next pass runs the prefix again
            raise
        finally:
            if frame.cache is not None:
                frame.cache.crop(len(frame.prefix_ids) - frame.cache.get_seq_length())   # (a count to remove)
        frame.features = None
        return out

    @staticmethod
    def _deferred(frame: LMMFrame) -> int:
        """How many prefix tokens the frame's next `_run_on_cache` runs before the given ids (0 once cached)."""
        return len(frame.prefix_ids) if frame.cache is None else 0

    # ---- F-LMM grounding pass ------------------------------------------------------------------
    def phrase_tokens(self, frame: LMMFrame, phrases: list[str], prompt_text: str = GROUNDING_PROMPT,
                      answer_prefix: str = "") -> tuple[list[int], list[torch.Tensor]]:
        """Token ids after the cached prefix, and each phrase's rows among them.

        The phrases are appended as the assistant's answer (F-LMM's teacher forcing), each followed by a
        '.' token that belongs to no phrase, like F-LMM's RefCOCO concat mode.
        """
        ids = self._text_ids(frame, prompt_text, answer_prefix)
        rows = []
        for phrase in phrases:
            phrase_ids = self.text_ids(phrase)
            if not phrase_ids:
                raise GroundingError(f"phrase {phrase!r} has no tokens")
            rows.append(torch.arange(len(ids), len(ids) + len(phrase_ids), device=self.device))
            ids = ids + phrase_ids + [self.separator_id()]
        return ids, rows

    @torch.no_grad()
    def phrase_pass(self, frame: LMMFrame, phrases: list[str], prompt_text: str = GROUNDING_PROMPT,
                    answer_prefix: str = "", questions: Sequence[str] = ()) -> PhrasePass:
        """One teacher-forced forward over the phrases (no generation): F-LMM's grounding pass.

        Returns each phrase's attention to the image (mean over its tokens) as maps, and its tokens' hidden
        states for the text embeddings. `questions` ("is there a red mug?": presence.py) are answered in the same
        forward (`answers`), each as its own turn over the frame (attention.side_by_side): what separate passes
        would give, for the overhead of one. So are the phrases' token log-probabilities when there are several:
        each phrase as the only answer, not after the others (a phrase's likelihood after another one's is lower)."""
        ids, rows = self.phrase_tokens(frame, phrases, prompt_text, answer_prefix)
        questions = list(dict.fromkeys(questions))
        turns, alone = [ids] + [self._text_ids(frame, q) for q in questions], []
        for phrase in phrases if len(phrases) > 1 else ():
            own, (own_rows,) = self.phrase_tokens(frame, [phrase], prompt_text, answer_prefix)
            turns, alone = turns + [own], alone + [own_rows + sum(map(len, turns))]
        return self._rows_pass(frame, turns, rows, questions, alone)

    @torch.no_grad()
    def answer_pass(self, frame: LMMFrame, prompt_text: str, answer_ids: list[int],
                    phrase_rows: list[list[int]]) -> PhrasePass:
        """Grounded conversation: one teacher-forced forward of `prompt_text` followed by a generated answer's
        own ids; phrase p is the answer tokens `phrase_rows[p]` (indices into `answer_ids`), so each phrase is
        grounded from the rows that generated it (the causal model attends as it did while generating)."""
        ids = self._text_ids(frame, prompt_text)
        if any(not r or min(r) < 0 or max(r) >= len(answer_ids) for r in phrase_rows):
            raise GroundingError(f"phrase rows {phrase_rows} do not index an answer of {len(answer_ids)} tokens")
        rows = [to_device(torch.tensor([len(ids) + i for i in r]), self.device) for r in phrase_rows]
        return self._rows_pass(frame, [ids + list(answer_ids)], rows)

    def _rows_pass(self, frame: LMMFrame, turns: list[list[int]], rows: list[torch.Tensor],
                   questions: list[str] = (), logprob_rows: list[torch.Tensor] = ()) -> PhrasePass:
        """One forward of turns[0] (rows index it) and the `questions`' turns beside it (side_by_side; then any
        other turns, where `logprob_rows` read the phrases' log-probabilities instead of `rows`), after the
        frame's prefix, cached or deferred (then it runs first in the same forward: rows shift by its length)."""
        shared = self._deferred(frame)
        start = 0 if shared else frame.cache.get_seq_length()
        rows = [r + shared for r in rows]
        ids = sum(turns, [])
        ends = (shared + np.cumsum([len(t) for t in turns]) - 1)[1:].tolist()   # each question's last row
        layout = side_by_side(turns, start, self.device, shared) if len(turns) > 1 else {}
        with capture_phrase_attention(rows, frame.image_keys) as capture:
            out = self._run_on_cache(frame, ids, output_hidden_states=True, **layout)
        hidden = torch.stack(out.hidden_states[1:])[:, 0]           # (L, T_chunk, d)
        maps = self.attention_to_maps(capture.maps(), frame.prepared)
        last = out.last_hidden_state[0]
        answers = dict(zip(questions, self.model.lm_head(last[ends]).float()))
        return PhrasePass(maps=maps, hidden_states=[hidden[:, r] for r in rows],
                          token_logprobs=self._token_logprobs(last, frame.prefix_ids[:shared] + ids,
                                                              [r + shared for r in logprob_rows] or rows),
                          answers=answers)

    def _token_logprobs(self, last_hidden: torch.Tensor, ids: list[int], rows: list[torch.Tensor]) -> list[torch.Tensor]:
        """log P(ids[r] | ids[:r]) for the rows of each phrase (row r is predicted by the output at r - 1; a row 0
        is predicted inside the cached prefix and left out)."""
        targets = ids_tensor(ids, self.device)[0]
        out = []
        for r in rows:
            r = r[r > 0]
            logp = self.model.lm_head(last_hidden[r - 1]).float().log_softmax(-1)
            out.append(logp.gather(-1, targets[r][:, None])[:, 0])
        return out

    # ---- answering -------------------------------------------------------------------------------
    def _feed(self, frame: LMMFrame, ids: list[int], **kwargs):
        """Forward `ids` after everything in the cache, extending it (callers crop it back)."""
        embeds = self.embed_tokens(ids_tensor(ids, self.device))
        return self.language_model(inputs_embeds=embeds, past_key_values=frame.cache, use_cache=True, **kwargs)

    def _greedy(self, out) -> int:
        return int(self.model.lm_head(out.last_hidden_state[:, -1]).argmax(-1))

    def generate(self, frame: LMMFrame, prompt_text: str, max_new_tokens: int, answer_prefix: str = "") -> str:
        """Greedy answer to `prompt_text` about the frame (bounded tokens, stops at EOS)."""
        return self.tokenizer.decode(self.generate_ids(frame, prompt_text, max_new_tokens, answer_prefix),
                                     skip_special_tokens=True).strip()

    @torch.no_grad()
    def generate_ids(self, frame: LMMFrame, prompt_text: str, max_new_tokens: int,
                     answer_prefix: str = "") -> list[int]:
        """The token ids of `generate`'s answer (EOS excluded)."""
        ids = self._continuation(frame, prompt_text, answer_prefix)
        before = frame.cache.get_seq_length()
        eos = self.tokenizer.eos_token_id
        generated: list[int] = []
        try:
            step = ids
            for _ in range(max_new_tokens):
                token = self._greedy(self._feed(frame, step))
                if token == eos:
                    break
                generated.append(token)
                step = [token]
        finally:
            frame.cache.crop(before - frame.cache.get_seq_length())
        return generated

    @torch.no_grad()
    def generate_scored(self, frame: LMMFrame, prompt_text: str, max_new_tokens: int, prefix_ids: list[int] = (),
                        banned_ids: list[int] | None = None, alternatives: int = 3) -> ScoredAnswer:
        """Constrained greedy decoding (answers.py): the answer that starts with `prefix_ids`, then never chooses
        a token of `banned_ids`. Returns it with its log-probability under the model (the unconstrained
        distribution, prefix and EOS included) so that such answers can be ranked, the first step where a ban
        changed the choice, and each step's `alternatives` likeliest allowed tokens (to branch from)."""
        ids = self._continuation(frame, prompt_text)
        banned = to_device(torch.tensor(sorted(banned_ids)), self.device) if banned_ids else None
        before = frame.cache.get_seq_length()
        eos = self.tokenizer.eos_token_id
        answer = ScoredAnswer([], 0.0, None, [])
        try:
            out = self._feed(frame, ids + list(prefix_ids))
            logps = self.model.lm_head(out.last_hidden_state[0, len(ids) - 1:]).float().log_softmax(-1)
            for step, token in enumerate(prefix_ids):
                answer.logprob += float(logps[step, token])
                answer.alternatives.append([])
            answer.ids, logp = list(prefix_ids), logps[-1]
            while len(answer.ids) < max_new_tokens:
                allowed = logp if banned is None else logp.index_fill(0, banned, float("-inf"))
                token = int(allowed.argmax())
                if answer.conflict is None and token != int(logp.argmax()):
                    answer.conflict = len(answer.ids)
                answer.logprob += float(logp[token])
                if token == eos:
                    break
                answer.alternatives.append([int(t) for t in allowed.topk(alternatives + 1).indices if int(t) != token])
                answer.ids.append(token)
                out = self._feed(frame, [token])
                logp = self.model.lm_head(out.last_hidden_state[0, -1]).float().log_softmax(-1)
        finally:
            frame.cache.crop(before - frame.cache.get_seq_length())
        return answer

    @torch.no_grad()
    def next_token_logits(self, frame: LMMFrame, prompt_text: str, answer_prefix: str = "") -> torch.Tensor:
        """(vocab,) float32 logits of the answer's next token after `prompt_text` (+ `answer_prefix`) about the
        frame: one short pass over the cached prefix, no generation (the presence check reads yes / no here)."""
        out = self._run_on_cache(frame, self._continuation(frame, prompt_text, answer_prefix))
        return self.model.lm_head(out.last_hidden_state[:, -1])[0].float()

    @torch.no_grad()
    def reasoning_pass(self, frame: LMMFrame, prompt_text: str, answer_prefix: str,
                       max_new_tokens: int) -> ReasoningPass:
        """F-LMM's reason_seg (`rebuttal` branch, frozen_llava.py), its grounding collected while generating.

        The prompt, answer prefix included, gives the first token; then greedy decoding runs for at most
        `max_new_tokens` steps (HF `generate` after that first token), each feeding the last token and keeping
        its attention to the image and its hidden states. The fed tokens are grounded, as one phrase: every
        generated token but the last (a generated '.' included, the answer prefix not); EOS stops early.
        """
        ids = self._continuation(frame, prompt_text, answer_prefix)
        before = frame.cache.get_seq_length()
        eos = self.tokenizer.eos_token_id
        row = [torch.zeros(1, dtype=torch.long, device=self.device)]   # the one query of each step
        attention, hidden = [], []
        try:
            generated = [self._greedy(self._feed(frame, ids))]
            for _ in range(max_new_tokens):
                with capture_phrase_attention(row, frame.image_keys) as capture:
                    out = self._feed(frame, generated[-1:], output_hidden_states=True)
                attention.append(capture.maps())                        # (1, L*H, n_image)
                hidden.append(torch.stack(out.hidden_states[1:])[:, 0])  # (L, 1, d)
                token = self._greedy(out)
                if token == eos:
                    break
                generated.append(token)
        finally:
            frame.cache.crop(before - frame.cache.get_seq_length())
        merged = merge_mean(torch.cat(attention), dim=0, dtype=self.dtype)[None]    # (1, L*H, n_image)
        maps = self.attention_to_maps(merged, frame.prepared)
        return ReasoningPass(generated, generated[:len(attention)], PhrasePass(maps, [torch.cat(hidden, dim=1)]))

    # ---- family-specific -----------------------------------------------------------------------
    model_class = None   # the transformers class to load

    @abstractmethod
    def prepare_image(self, image: np.ndarray) -> PreparedImage:
        """RGB uint8 (H, W, 3) -> model inputs, F-LMM's preprocessing for this family."""

    @abstractmethod
    def image_features(self, prepared: PreparedImage) -> torch.Tensor:
        """Vision tower + projector: (n_image_tokens, d) in sequence order."""

    @abstractmethod
    def attention_to_maps(self, attention: torch.Tensor, prepared: PreparedImage) -> torch.Tensor:
        """(P, L*H, n_image_tokens) -> (P, mask_head_channels, h, w) maps."""

    @abstractmethod
    def crop_to_image(self, logits: torch.Tensor, prepared: PreparedImage) -> torch.Tensor:
        """Mask-head logits (P, h, w) over the model's input -> over the image content only."""
