"""IP-Adapter FaceID family (SD1.5 and SDXL), shared by FaceID / FaceID-Plus / PlusV2 / Portrait, Face-MakeUp,
ConsistentID and InstantID.

- ``projection``: the ID-token projectors (MLPProjModel, ProjPlusModel + FacePerceiverResampler, InstantID's
  IDResampler).
- ``checkpoint``: one loader for every FaceID-family file (variant and base detection, strict keys, per-tensor
  casting).
- ``processors``: the 32 (SD1.5) / 140 (SDXL) attention processors (LoRA + to_k_ip/to_v_ip), validated.
- ``lora``: LoRA -> ComfyUI weight patches, processor index <-> ComfyUI block derived from the model.
- ``ip_weights``: per cross-attention site ID-branch projections for the engine's decoupled injector.
- ``mixing``: identity blending and averaging before the projector.
- ``controlnet_layout``: key-for-key check of a diffusers ControlNet (Face-MakeUp's group, InstantID's IdentityNet).
- ``controlnet``: those ControlNets built by ComfyUI and attached with the ID tokens as their context.
- ``apply``: CLIP-H hidden states, cond/uncond ID tokens, LoRA + decoupled injector on a model clone; Face-MakeUp and
  InstantID (adapter + ID-fed ControlNet).
"""
