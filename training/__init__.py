"""Training of the embedded models (trained here, on CPU, on scikit-learn's digits), apart from their definitions.

    loop             the one training loop: AdamW, warm-up + cosine learning rate, clipping, a warmed-up EMA
    train_embedded   the digits VAE and the class-conditional DiT-Digits (models/embedded/)
    train_text2img   the Stable Diffusion-layout text-to-image pipeline (models/embedded/text2img/)
    train_flow       the flow-matching pipeline in SD3's layout (models/embedded/flow/)
"""
