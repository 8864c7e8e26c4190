"""F-LMM's prompts and the prompt template that goes with each LMM family."""
from __future__ import annotations

# F-LMM's grounding prompt (every config under F-LMM's configs/).
GROUNDING_PROMPT = "Please give me a description of the image."

# xtuner prompt templates used by F-LMM (instruction part only, no system prompt).
PROMPT_TEMPLATES = {
    "vicuna": "USER: {input} ASSISTANT:",
    "mistral": "[INST] {input} [/INST]",
}


def template_for(model, tokenizer) -> str:
    """F-LMM's template for this LMM, from the model itself (not from its path): `mistral` when the language
    model is a Mistral or the tokenizer's chat template uses [INST] (llava-v1.6-mistral), else `vicuna`
    (llava-1.5, llava-v1.6-vicuna), as F-LMM's configs pair them."""
    text_type = getattr(getattr(model.config, "text_config", None), "model_type", "")
    chat = getattr(tokenizer, "chat_template", None)
    if text_type == "mistral" or (isinstance(chat, str) and "[INST]" in chat):
        return "mistral"
    return "vicuna"
