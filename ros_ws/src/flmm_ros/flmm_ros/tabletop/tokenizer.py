"""The word-level tokenizer of tabletop-tiny, with LLaVA-1.5's vicuna chat format.

One token per lower-cased word or punctuation mark (a `tokenizers` WordLevel model behind
`PreTrainedTokenizerFast`), `<s>` prepended like Llama's tokenizer, `<image>` as a special token
the LLaVA processor expands. The prompt format is LLaVA-1.5's:
`USER: <image>\\n{question} ASSISTANT: {answer}</s>`.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from .language import scene_vocabulary

BOS, EOS, PAD, UNK, IMAGE = "<s>", "</s>", "<pad>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)

# Chat roles and words of robot instructions beyond the scenes' own templates.
INSTRUCTION_WORDS = """
user assistant : please give me a an the description of image picture scene photo describe what
is are there this that these those it its them they one ones
pick up put place move push pull grab take get bring hand hold lift drop find show point at look
touch open close fill pour stack set turn go reach fetch carry throw wipe clean use
in on into onto under over behind beside near next to between from with and or but not no yes
left right middle centre center front back top bottom side corner edge table wall floor
can could would you i we my your our robot
where which who how many much colour color kind size shape type
big large small little tiny huge tall short long round square empty full
apple banana orange cup glass plate spoon fork knife block toy bottle box ball bowl mug can
object objects thing things item items
first second third last other another both all each every some any
here , . ? ! ' -
""".split()

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}USER: {% elif message['role'] == 'assistant' -%}ASSISTANT: {% endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{ item['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}</s>{%- else %} {% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)


def vocabulary() -> list[str]:
    """Special tokens first (fixed ids 0-4), then every word, sorted: stable across rebuilds."""
    words = sorted(set(scene_vocabulary()) | set(INSTRUCTION_WORDS))
    return list(SPECIAL_TOKENS) + [w for w in words if w not in SPECIAL_TOKENS]


def format_prompt(question: str, answer: str | None = None, image: bool = True) -> str:
    """The text the chat template renders for one turn (answer=None: ready for generation)."""
    prompt = f"USER: {IMAGE}\n{question} ASSISTANT:" if image else f"USER: {question} ASSISTANT:"
    return prompt if answer is None else f"{prompt} {answer}{EOS}"


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(vocabulary())}
    core = Tokenizer(WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()   # split on spaces and on each punctuation mark
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # "left ." -> "left."
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE}, chat_template=CHAT_TEMPLATE,
        model_max_length=512, padding_side="right")
    return tokenizer
