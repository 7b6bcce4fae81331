"""IP-Adapter FaceID family, shared by FaceID / FaceID-Plus / PlusV2, Face-MakeUp and ConsistentID.

- ``projection``: the ID-token projectors (MLPProjModel, ProjPlusModel + FacePerceiverResampler).
- ``checkpoint``: one loader for every FaceID-family file (variant detection, strict keys, per-tensor casting).
- ``processors``: the 32 attention processors (LoRA + to_k_ip/to_v_ip), validated.
- ``lora``: LoRA -> ComfyUI weight patches, processor index <-> ComfyUI block derived from the model.
- ``ip_weights``: per cross-attention site ID-branch projections for the engine's decoupled injector.
- ``mixing``: identity blending and averaging before the projector.
- ``controlnet_layout``: key-for-key check of Face-MakeUp's diffusers ControlNet group.
- ``apply``: CLIP-H hidden states, cond/uncond ID tokens, LoRA + decoupled injector on a model clone.
"""
