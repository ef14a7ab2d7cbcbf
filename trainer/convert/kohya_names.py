"""kohya layer names: a module path with every `.` turned into `_`, which loses where the dots were.

Turning one back splits at `_` and re-joins the identifiers that really contain an underscore
(`transformer_blocks`, `to_q`, ...). Every identifier of an SD UNet (both namings) and of CLIP is listed;
the caller then checks the path against the model layout, so an unknown name fails loudly instead of
producing a wrong path.
"""

_COMPOUNDS = {
    # UNet, ldm naming
    "input_blocks", "middle_block", "output_blocks", "in_layers", "emb_layers", "out_layers",
    "skip_connection", "time_embed", "label_emb",
    # UNet, diffusers naming
    "down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "conv_norm_out", "conv_shortcut",
    "time_embedding", "time_emb_proj", "add_embedding", "class_embedding", "linear_1", "linear_2",
    # transformer blocks (the same in both namings)
    "transformer_blocks", "proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out",
    # CLIP text encoders (Hugging Face layout)
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "layer_norm1", "layer_norm2",
    "final_layer_norm", "token_embedding", "position_embedding", "text_projection",
}
_LONGEST = max(compound.count("_") + 1 for compound in _COMPOUNDS)


def to_kohya(module_path: str) -> str:
    return module_path.replace(".", "_")


def from_kohya(name: str) -> str:
    """`down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0` -> `down_blocks.0....attn1.to_out.0`."""
    tokens = name.split("_")
    parts, index = [], 0
    while index < len(tokens):
        for width in range(min(_LONGEST, len(tokens) - index), 0, -1):
            candidate = "_".join(tokens[index:index + width])
            if width == 1 or candidate in _COMPOUNDS:
                parts.append(candidate)
                index += width
                break
    return ".".join(parts)
