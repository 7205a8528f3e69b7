"""Text side: tokenizers, ChatML prompt layout, grounding notation."""
