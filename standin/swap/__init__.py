"""Video face swap with Stand-In: a video of someone and a photo of someone else in, the video with the second
person's face out (`standin swap`).

The published method (Xue et al., "Stand-In: A Lightweight and Plug-and-Play Identity Control for Video
Generation", 2025; docs/method.md section 8; docs/swap.md) is zero-shot inpainting, with no weights of its own:
1. the reference photo is preprocessed as for generation (face crop, white background: the reference stream),
   and the same crop with an alpha mask of the person is the face to paste (`paste.ReferenceFace`);
2. in each frame of the video the largest face's five landmarks place the reference face by a similarity
   transform (rotation, uniform scale, translation), which is alpha-blended onto the frame; the mask of the frame
   is that warped alpha, dilated and feathered (`paste.paste_video`);
3. SDEdit: the pasted video is VAE-encoded, noised to the sampler's sigma at `strength` (0.85 published) and
   denoised by Stand-In with the reference (`pipeline.StandInSwapPipeline`);
4. optionally (background consistency), after every step the latents outside the mask are replaced by the
   original video noised to the next sigma, and by the clean original after the last step.
Longer videos go through in overlapping windows of the model's frame count, blended where they overlap
(`windows`); the audio track of the input is copied into the output (`media`).

Submodules import torch, cv2 and diffusers; this package itself imports nothing, so that `standin.swap.cli`
builds its parser instantly.
"""
