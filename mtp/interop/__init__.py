"""Interoperability with other model formats: `hf` exports a model's next-token path to a
Hugging Face `transformers` Llama (needs the optional extra: pip install 'mtp[hf]')."""
