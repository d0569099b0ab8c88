"""The sizes a memory plan needs, read from a transformers configuration: no weights are loaded.

florist's models are decoder-only transformers of the Llama family (Llama, SmolLM2, Qwen2, Mistral):
per layer an attention block of q, k, v and o projections and a gated MLP of gate, up and down
projections, each between RMSNorms. Their configurations name every size the plan uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PretrainedConfig


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied_embeddings: bool

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> ModelShape:
        """The sizes of a Llama-family configuration (a text model's, or a multimodal one's text part)."""
        config = config.get_text_config()
        missing = [key for key in ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "intermediate_size") if getattr(config, key, None) is None]
        if missing:
            raise ValueError(f"model configuration ({config.model_type}) has no {missing[0]}: the memory plan reads Llama-family sizes")
        heads = config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            vocab=config.vocab_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate=config.intermediate_size,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def projections(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each linear layer of one decoder layer, by module name."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (self.q_dim, h),
            "k_proj": (self.kv_dim, h),
            "v_proj": (self.kv_dim, h),
            "o_proj": (h, self.q_dim),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }

    def adapted(self, target_modules: Sequence[str]) -> dict[str, tuple[int, int]]:
        """(m, n) of every module a LoRA on `target_modules` adapts, by name in one layer; an entry
        that is not a decoder projection is refused, naming it."""
        projections = self.projections()
        for name in target_modules:
            if name not in projections:
                raise ValueError(
                    f"model.target_modules entry {name!r}: the memory plan knows the decoder projections {', '.join(projections)}"
                )
        return {name: projections[name] for name in target_modules}

    def module_paths(self, target_modules: Sequence[str]) -> dict[str, tuple[int, int]]:
        """(m, n) of every adapted module of the model, by its path as peft names it in a Llama."""
        blocks = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
        return {
            f"model.layers.{index}.{blocks.get(name, 'mlp')}.{name}": size
            for index in range(self.layers)
            for name, size in self.adapted(target_modules).items()
        }

    @property
    def layer_linear_params(self) -> int:
        return sum(m * n for m, n in self.projections().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        """The output projection's own weights: none when tied to the embeddings."""
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def parameters(self) -> int:
        return self.layers * self.layer_linear_params + self.embedding_params + self.lm_head_params + self.norm_params
