# ------------------------------------------------------------------------------------------
# FORK of an upstream file, audited by `make diff-upstream` (scripts/diff_upstream.py).
# upstream-package: transformers
# upstream-version: 5.23.0
# upstream-path: transformers/models/llava/modeling_llava.py
# upstream-sha256: 1f70f9725db729a8d3224c3a060e6db8b46e2b32282de00933835b206318d068
# Differences from upstream: relative imports made absolute, comment-only annotations, and
# code changes fenced by `# >>> pruning: <what and why>` ... `# <<< pruning`. With pruning
# disabled, every fence runs exactly the upstream statements.
# ------------------------------------------------------------------------------------------
# Copyright 2023 the HuggingFace Inc. team. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""PyTorch Llava model."""

from dataclasses import dataclass

import torch
from torch import nn

from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, ModelOutput
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, auto_docstring, logging, torch_compilable_check
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import select_hidden_states
from transformers.models.auto import AutoModel
from transformers.models.llava.configuration_llava import LlavaConfig
# >>> pruning: system C (two-stage learned vision-token pruning). `attach_pruning(model, config)` or
# `with llava_pruning(model, config):` (pruning/llava/runtime.py) sets the optional submodule
# `LlavaModel.vision_pruning`; each forward then opens one per-call state (a LlavaPruningPass) and hands it down in
# kwargs["vision_token_pruning"], to the fences below and to the decoder loop of the forked Llama, which drops tokens.
# A fork without the submodule runs the upstream statements in every fence.
from models.llama import modeling_llama as _forked_llama
# <<< pruning


logger = logging.get_logger(__name__)


@auto_docstring(
    custom_intro="""
    Base class for Llava outputs, with hidden states and attentions.
    """
)
@dataclass
class LlavaModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    past_key_values (`Cache`, *optional*, returned when `use_cache=True` is passed or when `config.use_cache=True`):
        It is a [`~cache_utils.Cache`] instance. For more details, see our [kv cache guide](https://huggingface.co/docs/transformers/en/kv_cache).

        Contains pre-computed hidden-states (key and values in the self-attention blocks) that can be used (see
        `past_key_values` input) to speed up sequential decoding.
    image_hidden_states (`torch.Tensor`, *optional*):
        A `torch.Tensor` of size `(batch_size, num_images, sequence_length, hidden_size)`.
        image_hidden_states of the model produced by the vision encoder and after projecting the last hidden state.
    """

    image_hidden_states: torch.Tensor | None = None


@auto_docstring(
    custom_intro="""
    Base class for Llava causal language model (or autoregressive) outputs.
    """
)
@dataclass
class LlavaCausalLMOutputWithPast(ModelOutput):
    r"""
    loss (`torch.Tensor` of shape `(1,)`, *optional*, returned when `labels` is provided):
        Language modeling loss (for next-token prediction).
    logits (`torch.Tensor` of shape `(batch_size, sequence_length, config.vocab_size)`):
        Prediction scores of the language modeling head (scores for each vocabulary token before SoftMax).
    past_key_values (`Cache`, *optional*, returned when `use_cache=True` is passed or when `config.use_cache=True`):
        It is a [`~cache_utils.Cache`] instance. For more details, see our [kv cache guide](https://huggingface.co/docs/transformers/en/kv_cache).

        Contains pre-computed hidden-states (key and values in the self-attention blocks) that can be used (see
        `past_key_values` input) to speed up sequential decoding.
    image_hidden_states (`torch.Tensor`, *optional*):
        A `torch.Tensor` of size `(batch_size, num_images, sequence_length, hidden_size)`.
        image_hidden_states of the model produced by the vision encoder and after projecting the last hidden state.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor] | None = None
    attentions: tuple[torch.Tensor] | None = None
    image_hidden_states: torch.Tensor | None = None


class LlavaMultiModalProjector(nn.Module):
    def __init__(self, config: LlavaConfig):
        super().__init__()
        # We have hidden_size * the number of vision feature layers
        num_feature_layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        self.linear_1 = nn.Linear(
            config.vision_config.hidden_size * num_feature_layers,
            config.text_config.hidden_size,
            bias=config.multimodal_projector_bias,
        )
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(
            config.text_config.hidden_size, config.text_config.hidden_size, bias=config.multimodal_projector_bias
        )

    def forward(self, image_features):
        hidden_states = self.linear_1(image_features)
        hidden_states = self.act(hidden_states)
        hidden_states = self.linear_2(hidden_states)
        return hidden_states


@auto_docstring
class LlavaPreTrainedModel(PreTrainedModel):
    config: LlavaConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]

    _supports_flash_attn = True
    _supports_sdpa = True

    _can_compile_fullgraph = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    # >>> pruning: a fork is not hub "custom code": it has upstream's exact parameter layout, so let transformers
    # treat it like the upstream class (apply the registered checkpoint key conversions, e.g. the original
    # llava-hf / Qwen2.5-VL key names, and initialise weights the same way). Without this, from_pretrained on a
    # real checkpoint silently leaves the language-model weights missing. Changes no forward computation.
    @classmethod
    def is_custom_code(cls) -> bool:
        return cls.is_remote_code()

    # <<< pruning


@auto_docstring(
    custom_intro="""
    The Llava model which consists of a vision backbone and a language model, without a language modeling head.
    """
)
class LlavaModel(LlavaPreTrainedModel):
    def __init__(self, config: LlavaConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)

        self.multi_modal_projector = LlavaMultiModalProjector(config)
        # >>> pruning: a Llama text model (LLaVA-1.5's Vicuna) is built from the forked LlamaModel, whose decoder
        # loop holds the token-dropping fences: same class name, parameters and forward as upstream's (audited; equal
        # bit for bit without pruning), so from_pretrained of a llava-hf checkpoint loads the upstream weights into it.
        # Any other text model: the upstream AutoModel line.
        if config.text_config.model_type == "llama":
            self.language_model = _forked_llama.LlamaModel._from_config(config.text_config)
        else:
            self.language_model = AutoModel.from_config(config.text_config)
        # <<< pruning
        self.post_init()

    @merge_with_config_defaults
    @can_return_tuple
    @select_hidden_states("vision_feature_layer")
    @auto_docstring(
        custom_intro="Obtains image last hidden states from the vision tower and apply multimodal projection."
    )
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | BaseModelOutputWithPooling:
        if image_sizes is not None:  # pass only when not-None, not all vision backbones accept it
            kwargs["image_sizes"] = image_sizes
        # >>> pruning: a selector that ranks patches by the tower's CLS attention (VisionZip-style) needs that
        # attention in the feature layer; SDPA does not return it, so it is computed after the tower from the layer's
        # own queries and keys, for the CLS row only, on the layer's input: capture that hidden state too.
        vision_pruning = getattr(self, "vision_pruning", None)
        records_cls_attention = (
            vision_pruning is not None and vision_pruning.needs_vision_attention and isinstance(vision_feature_layer, int)
        )
        if records_cls_attention and kwargs.get("output_hidden_states") is not True:
            kwargs["output_hidden_states"] = [vision_feature_layer - 1, vision_feature_layer]
        # <<< pruning
        image_outputs = self.vision_tower(
            pixel_values,
            return_dict=True,
            **kwargs,
        )
        # >>> pruning: [n_img, N] CLS attention of the feature layer (pruning/llava/baselines.py tower_cls_attention),
        # read by LlavaModel.forward's stage-2 fence; recorded only for a selector that needs it.
        if records_cls_attention:
            from pruning.llava.baselines import tower_cls_attention

            image_outputs["vision_attention"] = tower_cls_attention(
                self.vision_tower, image_outputs.hidden_states, vision_feature_layer
            )
        # <<< pruning

        # If we have one vision feature layer, return the corresponding hidden states,
        # otherwise, select the hidden states of each feature layer and concatenate them
        if isinstance(vision_feature_layer, int):
            selected_image_feature = image_outputs.hidden_states[vision_feature_layer]
            if vision_feature_select_strategy == "default":
                selected_image_feature = selected_image_feature[:, 1:]
        else:
            hs_pool = [image_outputs.hidden_states[layer_idx] for layer_idx in vision_feature_layer]
            # For default; crop CLS from each hidden state in the hidden state pool
            if vision_feature_select_strategy == "default":
                hs_pool = [hs[:, 1:] for hs in hs_pool]
            selected_image_feature = torch.cat(hs_pool, dim=-1)

        # >>> pruning: stage 1, the learnable token merger, sits between the CLIP features and the projector. It needs
        # the question (question-aware merger) and LlavaModel.forward must know where each merged token goes, and
        # generate() calls this method before the forward, without the prompt: so with a merger attached the selected
        # CLIP features [n_img, N, Dv] are returned unprojected, and LlavaModel.forward merges them to [n_img, M, Dv]
        # and runs the projector on the M tokens. No merger attached: the upstream projector line.
        vision_pruning = getattr(self, "vision_pruning", None)
        if vision_pruning is not None and vision_pruning.merges:
            if image_sizes is not None:
                raise ValueError("the vision-token merger supports fixed-size images (LLaVA-1.5), not image_sizes")
            image_features = selected_image_feature
        else:
            image_features = self.multi_modal_projector(selected_image_feature)
        # <<< pruning

        # If image_sizes is provided, we need to split the image features accordingly,
        # but only if the image_sizes is not None (the default in this and related architectures)
        if image_sizes is not None:
            split_sizes = (
                (torch.as_tensor(image_sizes, device=image_features.device) // self.vision_tower.patch_size)
                .prod(dim=-1)
                .tolist()
            )
            image_features = torch.split(image_features.squeeze(0), split_sizes)
        else:
            image_features = list(image_features)
        image_outputs.pooler_output = image_features

        return image_outputs

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ):
        """
        Obtains multimodal placeholder mask from `input_ids` or `inputs_embeds`, and checks that the placeholder token count is
        equal to the length of multimodal features. If the lengths are different, an error is raised.
        """
        if input_ids is None:
            special_image_mask = inputs_embeds == self.get_input_embeddings()(
                torch.full((), self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
            )
            special_image_mask = special_image_mask.all(-1)
        else:
            special_image_mask = input_ids == self.config.image_token_id

        n_image_tokens = special_image_mask.sum()
        n_image_features = image_features.shape[0] * image_features.shape[1]
        special_image_mask = special_image_mask.unsqueeze(-1).to(inputs_embeds.device)
        torch_compilable_check(
            n_image_tokens * inputs_embeds.shape[-1] == image_features.numel(),
            f"Image features and image tokens do not match, tokens: {n_image_tokens}, features: {n_image_features}",
        )
        return special_image_mask

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | LlavaModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")

        if pixel_values is not None and mm_encoder_outputs is not None:
            raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")

        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        # >>> pruning: the per-call state of system C (opened here unless LlavaForConditionalGeneration.forward already
        # did): it records the question tokens (the text after the image, or the `vision_question_mask` [B, T] kwarg,
        # popped here, that training passes so the pruner heads never see the answer) and travels in kwargs down to the
        # forked Llama's decoder loop. Nothing attached or disabled: none, and every fence is a no-op.
        pruning_pass = kwargs.get("vision_token_pruning")
        vision_pruning = getattr(self, "vision_pruning", None)
        question_mask = kwargs.pop("vision_question_mask", None)
        if pruning_pass is None and vision_pruning is not None and vision_pruning.enabled:
            pruning_pass = vision_pruning.open_pass(input_ids=input_ids, attention_mask=attention_mask,
                                                    past_key_values=past_key_values, question_mask=question_mask)
            kwargs["vision_token_pruning"] = pruning_pass
        # <<< pruning
        mm_encoder_outputs = mm_encoder_outputs if mm_encoder_outputs is not None else {}
        if mm_encoder_outputs.get("image") is None and pixel_values is not None:
            mm_encoder_outputs["image"] = self.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                image_sizes=image_sizes,
                return_dict=True,
            )

        if mm_encoder_outputs.get("image") is not None:
            image_features = mm_encoder_outputs["image"].pooler_output
            image_features = torch.cat(image_features, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
            # >>> pruning: stage 1. image_features holds the selected CLIP features [n_img*N, Dv] (see
            # get_image_features); the merger picks M centres by Gumbel-top-k on an importance head and softly assigns
            # every token to them (pruning/llava/modules.py TokenMerger): [n_img, M, Dv], 576 -> 288 on LLaVA-1.5-7B.
            # Safe: merged tokens live in the CLIP feature space the projector expects. The projector then runs on M
            # tokens, and merged token m goes to the placeholder of its centre (centres ascending, so token order and
            # the prompt's position numbering are kept); the other N - M placeholders get zero rows, which the decoder
            # loop drops before layer 0 (never attended to). Saves the projector and every LLM layer on N - M tokens.
            # [n_img*N, Dv] -> [n_img*N, D]; the upstream placeholder check and masked_scatter below run unchanged.
            if pruning_pass is not None and pruning_pass.merges:
                merged_features = pruning_pass.merge(image_features, inputs_embeds)
                image_features = pruning_pass.scatter_merged_tokens(self.multi_modal_projector(merged_features))
            # <<< pruning
            special_image_mask = self.get_placeholder_mask(
                input_ids, inputs_embeds=inputs_embeds, image_features=image_features
            )
            inputs_embeds = inputs_embeds.masked_scatter(special_image_mask, image_features)

        # >>> pruning: stage 2 runs in the decoder loop of the forked Llama (models/llama/modeling_llama.py), which
        # receives the per-call state in kwargs: tell it which rows [B, T] are image placeholders (None: no image in
        # this call, e.g. a decode step). At each pruning layer (default [10, 20, 31] of 32, scaled to [2, 4, 7] of 8)
        # a pruner head keeps a fraction of the vision tokens; the language model call below is upstream's. A selector
        # ranking by the tower's CLS attention [n_img, N] finds it here (recorded in get_image_features).
        if pruning_pass is not None:
            pruning_pass.set_image_tokens(
                special_image_mask[..., 0] if mm_encoder_outputs.get("image") is not None else None
            )
            if mm_encoder_outputs.get("image") is not None:
                pruning_pass.set_vision_attention(mm_encoder_outputs["image"].get("vision_attention"))
        # <<< pruning
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )

        return LlavaModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features if mm_encoder_outputs.get("image") is not None else None,
        )


@auto_docstring(
    custom_intro="""
    The LLAVA model which consists of a vision backbone and a language model.
    """
)
class LlavaForConditionalGeneration(LlavaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: LlavaConfig):
        super().__init__(config)
        self.model = LlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    @auto_docstring
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | BaseModelOutputWithPooling:
        return self.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            **kwargs,
        )

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | LlavaCausalLMOutputWithPast:
        r"""
        Example:

        ```python
        >>> from PIL import Image
        >>> from huggingface_hub.utils import httpx
        >>> from io import BytesIO
        >>> from transformers import AutoProcessor, LlavaForConditionalGeneration

        >>> model = LlavaForConditionalGeneration.from_pretrained("llava-hf/llava-1.5-7b-hf")
        >>> processor = AutoProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf")

        >>> prompt = "USER: <image>\nWhat's the content of the image? ASSISTANT:"
        >>> url = "https://www.ilankelman.org/stopsigns/australia.jpg"
        >>> with httpx.stream("GET", url) as response:
        ...     image = Image.open(BytesIO(response.read()))

        >>> inputs = processor(images=image, text=prompt, return_tensors="pt")

        >>> # Generate
        >>> generate_ids = model.generate(**inputs, max_new_tokens=15)
        >>> processor.batch_decode(generate_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
        "USER:  \nWhat's the content of the image? ASSISTANT: The image features a busy city street with a stop sign prominently displayed"
        ```"""
        # >>> pruning: open system C's per-call state here (not in LlavaModel.forward) so that the labels fence below
        # sees which rows survived; it travels down in kwargs. Nothing attached or disabled: none.
        pruning_pass = None
        vision_pruning = getattr(self.model, "vision_pruning", None)
        if vision_pruning is not None and vision_pruning.enabled:
            pruning_pass = vision_pruning.open_pass(
                input_ids=input_ids,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                question_mask=kwargs.pop("vision_question_mask", None),
            )
            kwargs["vision_token_pruning"] = pruning_pass
        # <<< pruning
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )

        hidden_states = outputs[0]
        hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        # >>> pruning: with tokens physically dropped ("drop" mode) the logits cover only the surviving rows
        # [B, T_kept, V]; the labels [B, T] are gathered at the same rows (no-op otherwise, and without pruning).
        if labels is not None and pruning_pass is not None:
            labels = pruning_pass.labels_for_output(labels)
        kwargs.pop("vision_token_pruning", None)
        # <<< pruning
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )

        return LlavaCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
        )


__all__ = ["LlavaForConditionalGeneration", "LlavaPreTrainedModel", "LlavaModel"]
