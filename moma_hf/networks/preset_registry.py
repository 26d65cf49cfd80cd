"""The foundation-model presets, one per model, each beside the sources of its facts.

Facts were read from the models' Hub cards and config.json files, their papers and the authors' repositories;
where a gated card could not be read, from several agreeing copies of its code, said so in `source`.
`tests/test_teacher_presets.py` builds every architecture on the meta device and checks the parameter count,
the embedding size and the normalization against these entries.
"""

from __future__ import annotations

from .teacher_presets import EmbeddingRecipe, TeacherPreset

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# H-optimus-0's card transform and config.json pretrained_cfg; H-optimus-1 and H0-mini use the same statistics.
HOPTIMUS_MEAN, HOPTIMUS_STD = (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)
SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}

# H-optimus-0/1: timm's DINOv2 ViT-g/14 with 4 registers. Their config.json has no model_args (timm takes
# img_size 224 from pretrained_cfg.fixed_input_size, which transformers' TimmWrapper does not read), so the
# preset supplies the card's arguments; the architecture's own defaults give SwiGLU and the registers.
_HOPTIMUS_CONFIG = {"architecture": "vit_giant_patch14_reg4_dinov2",
                    "model_args": {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False}}
# Virchow: ViT-H/14 with a SwiGLU MLP (mlp_ratio 5.3375) and LayerScale; no pooling, the card reads the tokens.
_VIRCHOW_ARGS = {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "",
                 "dynamic_img_size": True}

# The card's and papers' "632M" is 0.13% above what the card's own constructor builds (631.2M, timm 1.0.31),
# and without the card's SwiGLU arguments the count would be 771M: the figure is kept as published.
VIRCHOW_COUNT = "the card's architecture counts 631.2M; the published 632M is 0.13% higher"

PRESET_LIST = [
    TeacherPreset(
        name="phikon", hub_id="owkin/phikon", library="transformers",
        config={"model_type": "vit", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                "intermediate_size": 3072, "image_size": 224, "patch_size": 16, "qkv_bias": True,
                "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
        init_kwargs={"add_pooling_layer": False}, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        embedding=EmbeddingRecipe.CLS, embedding_dim=768, parameters="85.8M", gated=False,
        license="other (Owkin non-commercial)",
        source="https://huggingface.co/owkin/phikon (card: ViTModel.from_pretrained(..., add_pooling_layer=False), "
               "last_hidden_state[:, 0, :], 224 x 224, Params (M) 85.8; config.json and preprocessor_config.json); "
               "github.com/owkin/HistoSSLscaling README (0.5 um/px, 20x)",
    ),
    TeacherPreset(
        name="phikon-v2", hub_id="owkin/phikon-v2", library="transformers",
        config={"model_type": "dinov2", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                "image_size": 224, "patch_size": 16, "mlp_ratio": 4},
        mean=IMAGENET_MEAN, std=IMAGENET_STD, embedding=EmbeddingRecipe.CLS, embedding_dim=1024,
        parameters="0.3B", gated=False, license="other (Owkin non-commercial)",
        source="https://huggingface.co/owkin/phikon-v2 (card: ViT-L/16 via DINOv2, CLS token "
               "last_hidden_state[:, 0, :] of 1024 dims, 20x images); the repo's config.json could not be read, so "
               "the architecture here is DINOv2's ViT-L/16 at 224 px (the repo's own config is used when loading); "
               "ImageNet statistics from kaiko-ai/eva's loader. The card gives no count: ViT-L is 0.3B",
    ),
    TeacherPreset(
        name="uni", hub_id="MahmoodLab/UNI", library="timm",
        config={"architecture": "vit_large_patch16_224",
                "model_args": {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True}},
        mean=IMAGENET_MEAN, std=IMAGENET_STD, embedding=EmbeddingRecipe.CLS, embedding_dim=1024,
        parameters="0.3B", gated=True, license="cc-by-nc-nd-4.0",
        source="github.com/mahmoodlab/UNI README_old.md and uni/get_encoder/get_encoder.py (timm.create_model("
               "'hf-hub:MahmoodLab/UNI', init_values=1e-5, dynamic_img_size=True); model(image) of 1024 dims; "
               "ImageNet statistics; ViT-L/16 at 20x); https://huggingface.co/MahmoodLab/UNI (gated, CC-BY-NC-ND "
               "4.0). The card gives no count: ViT-L is 0.3B",
    ),
    TeacherPreset(
        name="uni2-h", hub_id="MahmoodLab/UNI2-h", library="timm",
        config={"architecture": "vit_giant_patch14_224",
                "model_args": {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                               "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8,
                               "dynamic_img_size": True}},
        constructor_classes=SWIGLU, mean=IMAGENET_MEAN, std=IMAGENET_STD, embedding=EmbeddingRecipe.CLS,
        embedding_dim=1536, parameters="681M", gated=True, license="cc-by-nc-nd-4.0",
        count_note="no published count: 681M is the count of the README's own constructor",
        source="github.com/mahmoodlab/UNI README (timm_kwargs of 'hf-hub:MahmoodLab/UNI2-h': ViT-h/14 with 8 "
               "registers, SwiGLUPacked/SiLU; model(image) of 1536 dims; Resize/CenterCrop 224 with ImageNet "
               "statistics); https://huggingface.co/MahmoodLab/UNI2-h (gated, CC-BY-NC-ND 4.0)",
    ),
    TeacherPreset(
        name="h-optimus-0", hub_id="bioptimus/H-optimus-0", library="timm", config=_HOPTIMUS_CONFIG,
        mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, embedding=EmbeddingRecipe.CLS, embedding_dim=1536,
        parameters="1.1B", gated=False, license="apache-2.0",
        source="https://huggingface.co/bioptimus/H-optimus-0 (card: timm.create_model(..., init_values=1e-5, "
               "dynamic_img_size=False), 224 px at 0.5 um/px, features = model(x) of 1536 dims, 1.1B parameters; "
               "config.json: vit_giant_patch14_reg4_dinov2, global_pool token, mean/std); github.com/bioptimus/"
               "releases models/h-optimus/v0/README.md",
    ),
    TeacherPreset(
        name="h-optimus-1", hub_id="bioptimus/H-optimus-1", library="timm", config=_HOPTIMUS_CONFIG,
        mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, embedding=EmbeddingRecipe.CLS, embedding_dim=1536,
        parameters="1.1B", gated=True, license="cc-by-nc-nd-4.0",
        source="gated card: https://huggingface.co/bioptimus/H-optimus-1 (gate: CC-BY-NC-ND 4.0); "
               "github.com/bioptimus/h1-jumpstart README (224x224 at 0.5 um/px, 1536-d output, 1.1B); "
               "resources.bioptimus.com launch note (1.1 billion parameters); loader kwargs and statistics from "
               "agreeing copies of the card's code (as H-optimus-0)",
    ),
    TeacherPreset(
        name="h0-mini", hub_id="bioptimus/H0-mini", library="timm",
        config={"architecture": "vit_base_patch14_reg4_dinov2",
                "model_args": {"img_size": 224, "init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.33334,
                               "global_pool": "", "dynamic_img_size": True}},
        constructor_classes=SWIGLU, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
        embedding=EmbeddingRecipe.CLS_MEAN_PATCH, embedding_dim=1536, parameters="85.7M", gated=True,
        license="cc-by-nc-nd-4.0", count_note="no published count: 85.7M is the count of the card's constructor",
        source="gated card: https://huggingface.co/bioptimus/H0-mini (gate: CC-BY-NC-ND 4.0); card code, from "
               "agreeing copies: mlp_layer=SwiGLUPacked, act_layer=SiLU, cat([cls, patch tokens.mean(1)]) of 1536 "
               "dims; docs.bioptimus.com SDK ModelSpec (H-optimus statistics, 224 px, 0.5 um/px, cls+patch_mean, "
               "1536); ViT-B/14 distilled from H-optimus-0 (arXiv 2501.16239). No published count: 85.7M counted",
    ),
    TeacherPreset(
        name="virchow", hub_id="paige-ai/Virchow", library="timm",
        config={"architecture": "vit_huge_patch14_224", "model_args": _VIRCHOW_ARGS}, constructor_classes=SWIGLU,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, embedding=EmbeddingRecipe.CLS_MEAN_PATCH, embedding_dim=2560,
        parameters="632M", gated=True, license="apache-2.0", count_note=VIRCHOW_COUNT,
        source="https://huggingface.co/paige-ai/Virchow (card: mlp_layer=SwiGLUPacked, act_layer=SiLU 'for proper "
               "init'; embedding = cat([class token, patch tokens.mean(1)]) of 2560 dims; 0.5 um/px (20x); 632M "
               "parameters; ImageNet statistics through its pretrained_cfg); arXiv 2309.07778",
    ),
    TeacherPreset(
        name="virchow2", hub_id="paige-ai/Virchow2", library="timm",
        config={"architecture": "vit_huge_patch14_224", "model_args": {**_VIRCHOW_ARGS, "reg_tokens": 4}},
        constructor_classes=SWIGLU, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        embedding=EmbeddingRecipe.CLS_MEAN_PATCH, embedding_dim=2560, parameters="632M", gated=True,
        license="cc-by-nc-nd-4.0", count_note=VIRCHOW_COUNT,
        source="gated card: https://huggingface.co/paige-ai/Virchow2 (gate: CC-BY-NC-ND 4.0); card code, from "
               "agreeing copies: SwiGLUPacked/SiLU, tokens 1-4 are registers, embedding = cat([class token, "
               "patch tokens[5:].mean(1)]) of 2560 dims; arXiv 2408.00738 (632M parameters, mixed 5x-40x "
               "magnification)",
    ),
]
PRESET_LIST.append(TeacherPreset(
    name="prov-gigapath", hub_id="prov-gigapath/prov-gigapath", library="timm",
    # timm's vit_giant_patch14_dinov2 brings SwiGLU and SiLU; the repo's model_args make its patches 16 px.
    config={"architecture": "vit_giant_patch14_dinov2",
            "model_args": {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
                           "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334}},
    mean=IMAGENET_MEAN, std=IMAGENET_STD, embedding=EmbeddingRecipe.CLS, embedding_dim=1536, parameters="1.1B",
    gated=True, license="other (prov-gigapath-license)",
    source="github.com/prov-gigapath/prov-gigapath README (timm.create_model('hf_hub:prov-gigapath/prov-gigapath', "
           "pretrained=True) with no extra arguments; Resize 256/CenterCrop 224, ImageNet statistics; 1536-d "
           "output); config.json as quoted by several users' code (vit_giant_patch14_dinov2, patch 16); "
           "https://huggingface.co/prov-gigapath/prov-gigapath (gated; licence tag prov-gigapath-license); "
           "Xu et al., Nature 2024 (1.1B parameters, 0.5 um/px)",
))
PRESETS = {preset.name: preset for preset in PRESET_LIST}
