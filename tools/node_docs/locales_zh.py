"""The Chinese (简体中文) texts of PlugKit's nodes: the source ``tools.node_docs.locales`` builds
``locales/zh/nodeDefs.json`` and ``locales/zh/main.json`` from, together with the live schemas.

One entry per node id: ``display_name``, ``description``, ``inputs`` {input id: (name, tooltip)},
``outputs`` [(name, tooltip)] in output order. When a node gains an input or output, add its texts
here and run ``.venv/bin/python -m tools.node_docs.locales``; the zh test fails while an entry is missing.
Technical names (FreeU, Diff-Plugin, SCB, TPB, CFG, PCA, seed values, option values) stay as they are.
"""
from __future__ import annotations

# Category path segments (the node library's folders).
CATEGORIES = {
    "PlugKit": "PlugKit",
    "FreeU": "FreeU",
    "Diff-Plugin": "Diff-Plugin 任务插件",
    "Plug-and-Play": "Plug-and-Play 特征注入",
    "Differential Diffusion": "差分扩散 (Differential Diffusion)",
    "Segmentation": "分割 (Segmentation)",
}

_MODEL_UNET = ("模型", "U-Net 模型（SD1.x、SD2.x、SDXL、SVD 等）。Flux、SD3 等 DiT 模型会被拒绝。")
_PLUGIN = ("插件", "来自“加载 Diff-Plugin 任务插件”的任务插件。")
_CLIP_VISION = ("CLIP视觉", "CLIP ViT-L/14 视觉模型（核心节点“加载CLIP视觉”），如 clip_vision_vit_l_14 / openai clip-vit-large-patch14。")
_VAE = ("VAE", "SD 1.x 的 VAE。")
_CANDIDATE = "候选任务插件 {i}（顺序即选中插件的执行顺序）。"
_START = ("起始方式", "起始潜空间。official (per task)：lowlight 与 highlight 插件（同名的官方文件夹，或以 start 'noise' 保存的 .safetensors 插件）"
                     "使用纯噪声，其他插件使用图像，同 infer.py 的 --inp_of_unet_is_random_noise 与 demo.py。noise：始终为纯噪声。"
                     "image：始终为图像的潜空间（由采样器加噪）。")
_RESIZE = ("缩放", "图像如何缩放后送入 VAE / SCB（CLIP 的输入始终是原图，同官方脚本）。infer.py（官方默认）：短边小于 512 像素时放大到 512，"
                   "然后两边缩放（不裁剪）到 8 的倍数；更大的图像保持原尺寸。demo.py：短边总是设为 512（大照片会缩小），再取 8 的倍数。"
                   "none：按原样使用图像（ComfyUI 的 VAE 会将其裁剪为 8 的倍数）。输出为缩放后的尺寸。")

NODES: dict[str, dict] = {
    "PlugKitFreeU": {
        "display_name": "FreeU (PlugKit)",
        "description": "FreeU：增强 U-Net 主干特征，并衰减解码器前两级跳跃连接特征的低频部分（Si 等，CVPR 2024）。",
        "inputs": {
            "model": _MODEL_UNET,
            "b1": ("b1", "最深解码级（4 倍基础通道）的主干系数。1 = 关闭。仅在 preset 为 'custom' 时使用。"),
            "b2": ("b2", "下一解码级（2 倍基础通道）的主干系数。1 = 关闭。仅在 preset 为 'custom' 时使用。"),
            "s1": ("s1", "最深一级跳跃特征低频部分的缩放系数。1 = 关闭。仅在 preset 为 'custom' 时使用。"),
            "s2": ("s2", "下一级跳跃特征低频部分的缩放系数。1 = 关闭。仅在 preset 为 'custom' 时使用。"),
            "version": ("版本", "v2：随结构变化的主干系数（同核心 FreeU_V2）。v1：常数系数（同核心 FreeU）。"),
            "start_percent": ("开始百分比", "FreeU 开始生效的采样进度（0 = 第一步），同 ControlNet 的 start_percent。"),
            "end_percent": ("结束百分比", "FreeU 停止的采样进度（1 = 最后一步）。范围外的步骤使用原始模型。"),
            "preset": ("预设", "'custom' 使用上面的 b1/b2/s1/s2；命名预设使用其数值（'SDXL sweep' 始终以调参时的 v1 运行）；"
                                "'auto' 选用 SD1.x、SD2.x 或 SDXL base 已公布的数值，其他模型（refiner、SVD、放大模型等）会被拒绝。"),
            "threshold": ("阈值", "被 s1/s2 缩放的低频方框的半宽（1 = 官方的 2x2 方框）。"),
            "threshold_mode": ("阈值模式", "'fixed'：各尺寸下方框都是 threshold 个频点（官方）。'resolution-aware'：方框随图像增大，"
                                          "使各分辨率过滤的频带与模型原生分辨率下相同。"),
            "apply_to": ("作用于", "FreeU 作用于每次模型计算（both，官方），或只作用于 ComfyUI 编码为正向（cond）或负向（uncond）的计算："
                                  "在 DualCFGGuider 下 cond2 算作负向，PerpNeg 的空提示词和 SAG 的额外计算算作 uncond。"),
            "other_models": ("其他模型", "没有 U-Net 解码器的模型（Flux、SD3 等 DiT）如何处理：'error' 停止运行并说明原因；"
                                        "'pass through' 原样传递模型并在日志中警告，适合切换模型系列的工作流。"),
        },
        "outputs": [("模型", "附加了 FreeU 的模型（输入模型不会被修改）。")],
    },
    "PlugKitTaskPluginLoader": {
        "display_name": "加载 Diff-Plugin 任务插件",
        "description": "从 models/diff_plugin 加载 Diff-Plugin 任务插件（TPB + SCB）：官方发布的文件夹（scb/ + tpb.pt）或 PlugKit 的 .safetensors 插件。",
        "inputs": {
            "plugin_name": ("插件名称", "models/diff_plugin 下的插件：官方任务文件夹（如 'derain'，内含 scb/ 和 tpb.pt）或 .safetensors 插件。"),
        },
        "outputs": [("插件", "加载的任务插件（TPB + SCB）。")],
    },
    "PlugKitApplyTaskPlugin": {
        "display_name": "应用 Diff-Plugin 任务插件",
        "description": "把退化图像变为任务插件的条件：Fp（TPB 输出）作为上下文，SCB 作为控制附加。请用 cfg 1.0 采样（其他 cfg 会记录警告）；"
                       "要使用与官方完全相同的采样器，请用 SamplerCustom 配合 Diff-Plugin 采样器与 sigmas，或用“运行 Diff-Plugin 插件链”。",
        "inputs": {
            "model": ("模型", "SD 1.x 模型（Diff-Plugin 在 SD 1.4 上训练）。克隆后原样返回。"),
            "plugin": _PLUGIN,
            "clip_vision": _CLIP_VISION,
            "vae": ("VAE", "SD 1.x 的 VAE；为 SCB 和起始潜空间编码退化图像。"),
            "image": ("图像", "退化图像（任意尺寸：resize 按官方脚本的方式缩放）。"),
            "strength": ("强度", "SCB 残差的缩放（1.0 = 官方流程）。"),
            "start": _START,
            "resize": _RESIZE,
        },
        "outputs": [("模型", "接入了 SCB 的模型。"), ("正向条件", "任务插件的条件（Fp 作为上下文）。"),
                    ("潜空间", "编码后的退化图像，作为采样的起始潜空间。")],
    },
    "PlugKitPluginSelector": {
        "display_name": "Diff-Plugin 插件选择器",
        "description": "用官方 Plugin-Selector 按指令为候选任务插件打分，按顺序返回选中的插件及全部分数。",
        "inputs": {
            "clip": ("CLIP", "SD 1.x 文本编码器（来自 Checkpoint 加载器）。"),
            "clip_vision": ("CLIP视觉", "CLIP ViT-L/14 视觉模型（核心节点“加载CLIP视觉”）。"),
            "image": ("图像", "退化图像（批次中只对第一张打分）。"),
            "instruction": ("指令", "用文字说明要做什么，例如 'remove rain and haze'（去除雨和雾）。"),
            "selector_name": ("选择器", "models/diff_plugin 下的选择器权重，例如 plugin_selector/PromptTunner.pt。"),
            "rule": ("规则", "官方：所有分数大于 0 的插件（官方演示的规则）。'above null'：分数高于空指令槽的插件。"),
            **{f"plugin_{i}": (f"插件_{i}", _CANDIDATE.format(i=i)) for i in range(1, 9)},
        },
        "outputs": [("插件列表", "选中的插件，按执行顺序。"), ("报告", "每个候选插件的分数与选择结果。")],
    },
    "PlugKitRunPluginChain": {
        "display_name": "运行 Diff-Plugin 插件链",
        "description": "按官方 demo.py 的方式依次应用选中的任务插件：每个插件的任务提示来自原图，第一个插件完整步数，之后每个插件在上一结果上运行少量步数（cfg 1）。",
        "inputs": {
            "model": ("模型", "SD 1.x 模型。"),
            "clip_vision": ("CLIP视觉", "CLIP ViT-L/14 视觉模型。"),
            "vae": _VAE,
            "image": ("图像", "退化图像。"),
            "seed": ("种子", "噪声种子（官方演示使用 42）。"),
            "steps": ("步数", "第一个插件的步数（官方：20）。"),
            "later_steps": ("后续步数", "之后每个插件的步数（官方：3）。"),
            "sampler_name": ("采样器", "official：与官方流程完全相同的采样（diffusers 的 UniPC，bh2，二阶，时间步 t = 999, 949, …，"
                                       "含其起始与最终潜空间；不使用 scheduler）。其他为 ComfyUI 的采样器配合 scheduler：接近官方结果，但不完全相同"
                                       "（ComfyUI 的 uni_pc_bh2 是三阶，且用其自己的时间网格）。"),
            "scheduler": ("调度器", "ComfyUI 采样器的 sigma 调度（official 采样器有自己的调度）。"),
            "plugins": ("插件列表", "来自“Diff-Plugin 插件选择器”的选中插件，按顺序运行。"),
            "plugin": ("插件", "或来自“加载 Diff-Plugin 任务插件”的单个插件（两者都连接时在 plugins 之后运行）：即该插件的官方结果。"),
            "start": (_START[0], _START[1] + "对插件链中的每个插件分别选择。"),
            "resize": (_RESIZE[0], _RESIZE[1] + "只在第一个插件之前应用一次（同 demo.py 的插件链）。"),
        },
        "outputs": [("图像", "依次应用插件后的图像。")],
    },
    "PlugKitTrainTaskPlugin": {
        "display_name": "训练 Diff-Plugin 任务插件",
        "description": "在（退化图, 清晰图）成对图像文件夹上训练新的任务插件（TPB + SCB），U-Net、VAE 与 CLIP 视觉保持冻结；保存为 models/diff_plugin/<plugin_name>.safetensors。",
        "inputs": {
            "model": ("模型", "冻结的 SD 1.x 模型（LoRA 和补丁会生效）。"),
            "clip_vision": ("CLIP视觉", "CLIP ViT-L/14 视觉模型（冻结）。"),
            "vae": ("VAE", "SD 1.x 的 VAE（冻结）。"),
            "data_folder": ("数据文件夹", "包含 'input/'（退化图）和 'target/'（清晰图）的文件夹，按文件名配对（也接受 degraded|lq 与 gt|clean）。"),
            "plugin_name": ("插件名称", "输出名称：models/diff_plugin/<plugin_name>.safetensors（以及 .optim.pt）。"),
            "resolution": ("分辨率", "训练裁剪尺寸（像素，官方：512）。"),
            "steps": ("步数", "优化总步数（继续训练时计入已保存的步数）。"),
            "batch_size": ("批次大小", "每个微步的图像对数量（官方 train_batch_size；默认 1）。"),
            "learning_rate": ("学习率", "AdamW 基础学习率（官方：1e-5，权重衰减 1e-2）；见 lr_scaling。"),
            "save_every": ("保存间隔", "每 N 步保存一次插件（0：只在结束时保存）。保存是原子操作。"),
            "seed": ("种子", "噪声与时间步的种子。"),
            "resume": ("继续训练", "如果该 plugin_name 已有保存，则从最后一次保存继续。关闭时：已存在同名文件会报错（绝不覆盖）。"),
            "start": ("起点", "使用该插件采样时的起点：加噪的输入（大多数任务）或纯噪声（如 lowlight / highlight）。"),
            "grad_accum": ("梯度累积", "每步累积的微批次数（官方 gradient_accumulation_steps；默认 1）：每步使用 batch_size x grad_accum 对图像。"),
            "lr_scaling": ("学习率缩放", "official（train.py 的 scale_lr，官方始终开启）：学习率乘以 batch_size x grad_accum（x GPU 数）；none：按给定值使用。"),
            "augment": ("数据增强", "官方 --use_data_aug：随机裁剪（概率 1/2）和水平翻转（概率 1/2），两张图相同，再缩放到训练分辨率。关闭（官方默认）：短边缩放、中心裁剪（官方则把整张图拉伸成正方形）。"),
            "precision": ("精度", "前向计算的数据类型（autocast）。插件权重保持 fp32；fp16 使用损失缩放；bf16 需要支持它的 GPU。fp32 精确但最慢。"),
            "validate_every": ("验证间隔", "每 N 步对第一对图像运行官方 20 步推理，并在进度条和 'validation' 输出中显示（输入 | 插件输出 | 目标）；0：不验证。"),
        },
        "outputs": [("插件", "训练得到的任务插件。"), ("报告", "训练摘要（步数、损失、保存位置）。"),
                    ("验证", "验证图像（输入 | 插件输出 | 目标），每次验证一张；validate_every 为 0 时为空白图像。"),
                    ("损失曲线", "每一步的损失曲线图。")],
    },
    "PlugKitPnPInvert": {
        "display_name": "Plug-and-Play 反演 (PlugKit)",
        "description": "对源图像做确定性的 DDIM 反演（Plug-and-Play，Tumanyan 等 2023）。把 PNP_SOURCE 接到“Plug-and-Play 注入”，"
                       "把 LATENT 接到 KSampler（高级）（关闭 add_noise，步数与调度器相同），或接到 SamplerCustom 并把同一 SIGMAS 也接到这里。"
                       "在其他 sigma 上的采样会被拒绝。",
        "inputs": {
            "model": ("模型", "用于反演和采样的 U-Net 模型（SD1.x、SD2.x 或 SDXL）。"),
            "samples": ("潜空间", "VAE 编码后的源图像（VAE 编码）。"),
            "conditioning": ("条件", "反演提示词。官方默认是空提示词：文本为空的 CLIP 文本编码。"),
            "steps": ("步数", "将使用此源的采样步数（官方代码用 50）。采样器中请使用相同的步数；其他步数会被拒绝。"),
            "inversion_steps": ("反演步数", "反演精度：约这么多次模型评估，均匀分布在模型的 1000 个时间步上（每个采样步至少一次）。"
                                          "50 = 50 步采样时每步一次（快）。越多重建越好、越慢。在 inversion_resolution 为 'inversion_steps' 时使用。"),
            "scheduler": ("调度器", "采样器的调度器（连接 sigmas 时忽略）。ddim_uniform 配合 ddim 采样器和相同步数复现官方方法；"
                                  "采样器必须使用此调度器和步数。"),
            "inversion_resolution": ("反演精度", "'official 999'：每个模型时间步反演一步，同官方 preprocess.py（999 步；重建最好，约比 50 慢 20 倍）。"
                                               "'inversion_steps'：使用 inversion_steps 输入。"),
            "source_prompt": ("源提示词", "采样时源分支的提示词。官方代码在这里始终使用空提示词：连接文本为空的 CLIP 文本编码（随附的工作流就是这样）。"
                                        "不连接：使用反演提示词（反演提示词为空时两者相同，即官方默认）。"),
            "sigmas": ("sigmas", "可选：采样器自己的 SIGMAS（如 BasicScheduler 接到 SamplerCustom）。此时源图像精确地在这些 sigma 上反演，"
                               "忽略 steps/scheduler：任何调度器、步数或 denoise 都精确。"),
            "fixed_point_iterations": ("不动点迭代", "更快且忠实的反演（官方代码没有此选项）：对每个反演步做这么多次细化，使一个 DDIM 采样步能把它精确地退回；"
                                                 "每次迭代每步多一次模型评估。0 = 官方的一步。1 且 inversion_steps = steps（50 步共 100 次评估）时，"
                                                 "源图像的重建与 'official 999' 相当或更好（测量见 docs/pnp.md）。"),
        },
        "outputs": [("PNP源", "反演得到的源轨迹及其条件，用于“Plug-and-Play 注入”和“特征图”。"),
                    ("潜空间", "第一个采样步的反演潜空间：关闭 add_noise 对它采样。")],
    },
    "PlugKitPnPInject": {
        "display_name": "Plug-and-Play 注入 (PlugKit)",
        "description": "采样时源图像在同一批次中运行；在前若干步中，用源的解码器 ResBlock 特征和自注意力 q/k 替换目标的（Plug-and-Play）。"
                       "适用于 ComfyUI 的 CFG 和其他补丁；采样器必须在反演的 sigma 上运行且不加噪声（会检查：其他运行会被拒绝）。",
        "inputs": {
            "model": ("模型", "用于采样的 U-Net 模型（与反演时同一系列）。"),
            "pnp_source": ("PNP源", "来自“Plug-and-Play 反演”。"),
            "feature_injection": ("特征注入", "注入解码器 ResBlock 特征的前段采样步比例：源调度的前 int(steps x 比例) 步，分段运行时跨段计数（官方 0.8）。越高保留越多结构。"),
            "attention_injection": ("注意力注入", "注入自注意力 q 和 k 的前段采样步比例：源调度的前 int(steps x 比例) 步（官方 0.5）。越高保留越多布局与外观。"),
            "feature_blocks": ("特征块", "高级：注入其第一个 ResBlock 的解码器（输出）块，如 '4' 或 '4, 5'。留空：按模型系列默认（SD1.x/2.x：4，SDXL：1）。"),
            "attention_blocks": ("注意力块", "高级：注入自注意力 q/k 的解码器块，如 '4-11'。留空：按模型系列默认（SD1.x/2.x：4-11，SDXL：1-5）；'none' 关闭。"),
            "source_mode": ("源分支模式", "in-batch：每个注入步里源图与目标在同一批次中计算（不占额外内存）。cache：第一次运行把源图注入用的特征和 q/k 保存在 PNP_SOURCE 中；之后同一源图、同一调度和同一模型的运行直接复用，不再计算源分支（接近普通采样的速度；SD1.5 512 像素、默认窗口：fp16 约 0.7 GB，放在 GPU 上）。cache on CPU：同上，但保存在系统内存中。"),
        },
        "outputs": [("模型", "带 Plug-and-Play 注入的模型；用它对反演得到的 LATENT 采样。")],
    },
    "PlugKitFeatureMap": {
        "display_name": "Plug-and-Play 特征图 (PlugKit)",
        "description": "显示某个解码器块在某一采样步看到的源图像内容：其 ResBlock 特征或自注意力的前三个 PCA 分量，以颜色表示。用来选择注入块。",
        "inputs": {
            "model": ("模型", "反演源图像所用的模型（连接原始模型，不是注入后的模型）。"),
            "pnp_source": ("PNP源", "来自“Plug-and-Play 反演”。"),
            "block": ("块", "解码器（输出）块。-1：该系列默认注入的特征块（SD1.x/2.x：4，SDXL：1）。"),
            "step": ("步", "源调度中的采样步（0 = 噪声最大的一步，即注入开始处）。使用源分支的提示词渲染。"),
            "kind": ("类型", "features：该块第一个 ResBlock 的残差特征（即被注入的内容）。self-attention：其第一个自注意力图的各行（各头平均）。"),
        },
        "outputs": [("图像", "PCA 前三个分量作为 RGB，尺寸与源图像相同。")],
    },
    "PlugKitDifferentialDiffusion": {
        "display_name": "差分扩散 (PlugKit)",
        "description": "按变化图让每个像素以各自的程度变化。把 MODEL 和 LATENT 输出接到同一个采样器。",
        "inputs": {
            "model": ("模型", "要打补丁的扩散模型（ComfyUI 能采样的任何模型：SD1.x、SDXL、SD3、Flux 等）。"),
            "samples": ("潜空间", "要编辑的已编码图像（如来自 VAE 编码）。"),
            "change_map": ("变化图", "每个像素可变化的程度，0..1（见 map_convention）。任意尺寸：会缩放到潜空间大小。"),
            "strength": ("强度", "1：变化图的逐步二值遮罩（差分扩散）。更低的值混入软遮罩（0：普通软遮罩重绘）。"),
            "map_convention": ("变化图约定", "white=change：ComfyUI 的约定（白 = 完全变化，黑 = 保留）。white=keep：官方代码和论文的约定。"),
            "schedule": ("调度", "sigma：ComfyUI 核心的规则（阈值与模型时间步成线性）。step：官方规则（exx8/differential-diffusion）："
                                 "保留值为 k 的像素在运行的 N 步中、每个 i < k*N 的步开始时重置为原图；用 euler 配合 ddim_uniform 的 sigma 时"
                                 "与官方 DDIM 循环相同（实测：8、10、50 步下相对误差小于 1e-6，white=keep）。"),
            "exact_keep": ("严格保留", "永不释放变化值为 0 的像素。sigma：在结束于模型最小 sigma 的调度器（normal、karras）的最后一步也不释放（核心会释放）。"
                                     "step：最后一步也不释放（官方代码会让它们变化一次）。关闭时复现核心（sigma）与官方代码（step）。"),
            "map_resize": ("变化图缩放", "变化图如何适配潜空间尺寸。bilinear：无抗锯齿，与官方代码和核心（SetLatentNoiseMask）完全相同。"
                                         "area：每个潜空间像素取其覆盖的变化图像素的平均值（缩小 8 倍时硬边缘不产生锯齿）。"),
            "total_steps": ("总步数", "仅 step 调度。0：阈值按本采样器运行的步数计算（官方 SD2 代码）。N：阈值按 N 步计算，本次运行为其中从 first_step 开始的步"
                                    "（官方 SDXL 代码：N = 其 num_inference_steps；refiner 阶段 first_step = base 阶段的步数；denoise < 1 时 N = 调度器的完整步数）。"),
            "first_step": ("起始步", "step 调度且 total_steps > 0 时：本次运行第一步的全局序号（如 KSampler（高级）的 start_at_step）。"),
        },
        "outputs": [("模型", "带差分扩散遮罩调度的模型。"), ("潜空间", "附加了变化图作为噪声遮罩的潜空间（白 = 变化，潜空间尺寸）。")],
    },
    "PlugKitChangeMap": {
        "display_name": "变化图 (PlugKit)",
        "description": "把图像（渐变、深度图、手绘）或遮罩转换为差分扩散的变化图。",
        "inputs": {
            "channel": ("通道", "哪个图像值成为变化图：luminance（Rec. 601，与 Pillow 的 \"L\" 完全相同，官方代码即以此加载变化图；8 位级差）、"
                           "luminance_709（Rec. 709，不量化）、单个通道或 RGB 平均。对遮罩无效。"),
            "invert": ("反转", "翻转变化图（1 - 值），例如把近处为白的深度图变为近处保留。"),
            "gamma": ("伽马", "值 ** gamma：大于 1 压暗中间调，小于 1 提亮中间调。"),
            "contrast": ("对比度", "以中灰为中心的对比度：(值 - 0.5) * contrast + 0.5，限制在 0..1。"),
            "blur_radius": ("模糊半径", "高斯模糊 / 羽化半径（像素，sigma = 半径 / 2）；使接缝更柔和。"),
            "levels": ("色阶数", "量化为这么多个等间距级别（0 或 1：关闭）。"),
            "min_value": ("最小值", "限制：变化图的最低值。"),
            "max_value": ("最大值", "限制：变化图的最高值。"),
            "image": ("图像", "源图像（连接它或 mask 之一，不要同时连接）。"),
            "mask": ("遮罩", "源遮罩（连接它或 image 之一，不要同时连接）。"),
        },
        "outputs": [("变化图", "变化图（MASK，0..1）。"), ("预览", "变化图的灰度 IMAGE。")],
    },

    "PlugKitDiffPluginSampler": {
        "display_name": "Diff-Plugin 官方采样器",
        "description": "官方 Diff-Plugin 采样器（diffusers 的 UniPC，按 infer.py 的方式运行：bh2，二阶，含其起始潜空间以及在每个 t >= 960 的步重新加噪），"
                       "作为 SamplerCustom 的 SAMPLER。请配合“Diff-Plugin 官方 Sigmas”、cfg 1.0、开启 add_noise，并使用“应用 Diff-Plugin 任务插件”的 model、positive 和 latent。",
        "inputs": {
            "start": ("起始方式", "image：infer.py 的默认，把潜空间（“应用 Diff-Plugin 任务插件”的图像潜空间）在每个 t >= 960 的步加噪到该步。"
                                "noise：纯噪声（lowlight / highlight，infer.py 的 --inp_of_unet_is_random_noise）；不使用潜空间。"),
        },
        "outputs": [("采样器", "用于 SamplerCustom 的 sampler 输入。")],
    },
    "PlugKitDiffPluginSigmas": {
        "display_name": "Diff-Plugin 官方 Sigmas",
        "description": "官方的时间步（diffusers UniPC 的 linspace 网格：20 步 = t 999, 949, …, 50，最后到 t = 0），"
                       "作为 SIGMAS 供 SamplerCustom 与 Diff-Plugin 采样器一起使用。",
        "inputs": {
            "model": ("模型", "SD 1.x 模型（由其噪声调度得到 sigma）。"),
            "steps": ("步数", "步数（官方：20）。"),
        },
        "outputs": [("sigmas", "用于 SamplerCustom 的 sigmas 输入，配合“Diff-Plugin 官方采样器”。")],
    },
    "PlugKitFeatureSegment": {
        "display_name": "特征分割 (PlugKit)",
        "description": "用训练好的特征分割器分割一批图像：输出某一类的遮罩、每一类的遮罩、彩色标签图以及集成模型的不确定度。",
        "inputs": {
            "segmenter": ("分割器", "来自“训练特征分割器”或“加载分割器”。"),
            "model": ("模型", "训练分割器时使用的 MODEL（同一 checkpoint）。"),
            "vae": ("VAE", "训练分割器时使用的 VAE。"),
            "images": ("图像", "要分割的图像（一个批次或视频帧），尺寸为 8 像素的倍数；在训练尺寸下效果最好。"),
            "class_index": ("类别序号", "作为 mask 输出的类别（遮罩训练：1 = 绘制的类别；标签图训练：类别按颜色编号，黑色为第一个）。"),
        },
        "outputs": [("遮罩", "每张图像一个遮罩：多数投票为 class_index 处为 1。"),
                    ("各类遮罩", "每张图像的每个类别：第 i 张图像的类别 c 位于序号 i * classes + c。"),
                    ("标签图", "以训练时的颜色表示的分割结果。"),
                    ("不确定度", "集成模型在每个像素上的分歧，0..1（官方的 Jensen-Shannon 分数除以 ln(类别数)）。")],
    },
    "PlugKitFeatureSegmenterTrain": {
        "display_name": "训练特征分割器 (PlugKit)",
        "description": "少标注语义分割（Baranchuk 等，ICLR 2022）：利用 U-Net 解码器在几个噪声水平下的特征和一组小型像素分类器（集成），"
                       "只需几张绘制了遮罩的图像即可学会分割。",
        "inputs": {
            "model": ("模型", "U-Net checkpoint 的 MODEL（SD1.x、SD2.x、SDXL）。分割时请使用同一个。"),
            "vae": ("VAE", "该 checkpoint 的 VAE：把图像编码为潜空间。"),
            "images": ("图像", "训练图像（通常 2-5 张），尺寸相同，为 8 像素的倍数。"),
            "steps": ("步", "读取 U-Net 的噪声步 t（0-999），每个一次 U-Net 计算。官方：50, 150, 250。"),
            "blocks": ("块", "其输出作为特征的解码器（输出）块，如 '5-9'。留空：按模型系列默认（SD1.x/2.x：5, 6, 7, 8, 9；SDXL：2-6），"
                            "由官方的 5, 6, 7, 8, 12 映射而来。"),
            "ensemble_size": ("集成数量", "参与投票的像素分类器数量（官方：10）。它们的分歧即不确定度。"),
            "resolution": ("分辨率", "latent：每个潜空间单元（8x8 像素，取其多数标签）一个训练样本，CPU 上也快。"
                                  "image：每个图像像素，特征经双线性上采样（官方做法），样本多 64 倍。"),
            "batch_size": ("批次大小", "每个优化步的像素数（官方：64）。"),
            "max_epochs": ("最大轮数", "训练轮数上限（官方：100）；官方的提前停止通常在约 5 轮后结束训练。"),
            "seed": ("种子", "固定噪声（所有图像共用，同官方的 share_noise）与分类器的种子。"),
            "masks": ("遮罩", "单个类别：每张图像一个遮罩（如在遮罩编辑器中绘制）；白 = 该类别，黑 = 背景。连接它或 label_image 之一。"),
            "label_image": ("标签图", "多个类别：每张训练图像一张标签图，每个类别一种纯色（无抗锯齿）。连接它或 masks 之一。"),
            "conditioning": ("条件", "可选：U-Net 计算使用的文本条件（如文本为空的 CLIP 文本编码）。不连接：零文本上下文。"
                                    "它保存在分割器中，分割时会再次使用。"),
        },
        "outputs": [("分割器", "训练得到的分割器，用于“特征分割”和“保存分割器”。"),
                    ("报告", "训练像素上每个类别的像素准确率、特征大小与耗时。")],
    },
    "PlugKitLoadSegmenter": {
        "display_name": "加载分割器 (PlugKit)",
        "description": "加载保存在 models/plugkit_segmenters 下的特征分割器（extra_model_paths.yaml 中为 'plugkit_segmenters:'）。",
        "inputs": {
            "segmenter_name": ("分割器名称", "models/plugkit_segmenters 下的 .safetensors 文件。"),
        },
        "outputs": [("分割器", "分割器，用于“特征分割”。")],
    },
    "PlugKitSaveSegmenter": {
        "display_name": "保存分割器 (PlugKit)",
        "description": "把特征分割器保存为 models/plugkit_segmenters/<name>.safetensors。",
        "inputs": {
            "segmenter": ("分割器", "来自“训练特征分割器”。"),
            "name": ("名称", "models/plugkit_segmenters 中的文件名（会添加 '.safetensors'）；可用 'faces/eyes' 这样的子文件夹，'..' 和绝对路径会被拒绝。"),
            "overwrite": ("覆盖", "替换已存在的同名文件。"),
        },
        "outputs": [("路径", "写入的文件。")],
    },
}

# Extra notes of each node's Chinese help page (js/docs/<NodeId>/zh.md, written by tools.node_docs.locales).
NOTES: dict[str, list[str]] = {
    "PlugKitFreeU": [
        "默认的附加输入下，结果与核心节点 **FreeU_V2**（`version` 为 v2）或 **FreeU**（v1）在相同 b/s 数值下完全一致。",
        "串联时离采样器最近的 FreeU 生效：PlugKitFreeU 会替换其输入上已有的 FreeU（并记录日志），FreeU 永远不会被应用两次。",
        "`b = 1` 跳过主干缩放，`s = 1` 跳过傅里叶滤波，所以 1/1/1/1 与原始模型完全相同。",
        "论文：[arXiv 2309.11497](https://arxiv.org/abs/2309.11497) · 官方代码：[ChenyangSi/FreeU](https://github.com/ChenyangSi/FreeU)",
    ],
    "PlugKitTaskPluginLoader": [
        "把官方发布的任务文件夹（`derain`、`desnow`、`dehaze`、`deblur`、`demoire`、`lowlight`、`highlight`、`face`，各含 `scb/` 与 `tpb.pt`）原样放在 `ComfyUI/models/diff_plugin/` 下。",
        "官方权重的许可为 CC BY-NC-SA 4.0：仅限非商业用途。",
        "官方代码：[yuhaoliu7456/Diff-Plugin](https://github.com/yuhaoliu7456/Diff-Plugin)",
    ],
    "PlugKitApplyTaskPlugin": [
        "按官方推理方式采样：**cfg 1.0**（此时 `negative` 不起作用）、UniPC（`uni_pc_bh2`）、**20 步**、denoise 1.0。结果接近官方，但不完全相同。",
        "要得到与官方完全一致的结果，请用 SamplerCustom 配合“Diff-Plugin 官方采样器”与“Diff-Plugin 官方 Sigmas”，"
        "或把插件接到“运行 Diff-Plugin 插件链”的 `plugin` 输入：其默认的 `official` 采样器复现官方采样循环。",
    ],
    "PlugKitPluginSelector": [
        "选择器按指令与图像为每个候选插件打分；`report` 输出列出全部分数，节点上也会显示。",
        "把选中的插件接到“运行 Diff-Plugin 插件链”的 `plugins` 输入。",
    ],
    "PlugKitRunPluginChain": [
        "第一个插件在输入上运行 `steps` 步；之后每个插件在上一结果（解码后再编码）上运行 `later_steps` 步，均为 cfg 1。",
        "默认的 `official` 采样器与官方流程的采样完全一致，因此 `plugin` 输入上的单个插件即给出该插件的官方结果。",
    ],
    "PlugKitTrainTaskPlugin": [
        "与官方 `train.py` 相同：ε 的均方误差、均匀时间步、AdamW（权重衰减 1e-2）、梯度裁剪 1.0、学习率按批次缩放（lr_scaling official）。",
        "图像对按批次读取、裁剪和编码，内存不随数据集大小增长。多 GPU：命令行用 `torchrun --nproc_per_node N` 启动（见 docs/diff_plugin.md）。",
        "也可在命令行训练：在 ComfyUI 文件夹中运行 `python custom_nodes/plugkit/cli.py train-diff-plugin --help`"
        "（git 安装为 `custom_nodes/ComfyUI-PlugKit/cli.py`；请使用你的文件夹名）。实际训练需要 GPU。",
    ],
    "PlugKitPnPInvert": [
        "官方设置：DDIM 50 步、空的反演提示词、999 次反演步。",
        "把 `LATENT` 接到 KSampler（高级）：`add_noise` 设为 disable，采样器 ddim，调度器 ddim_uniform，步数与这里相同。",
        "论文：Plug-and-Play Diffusion Features（CVPR 2023）· 官方代码：[MichalGeyer/pnp-diffusers](https://github.com/MichalGeyer/pnp-diffusers)",
    ],
    "PlugKitPnPInject": [
        "官方设置：CFG 7.5，负向提示词 “ugly, blurry, black, low res, unrealistic”，特征注入 0.8（50 步中的前 40 步）、注意力注入 0.5（前 25 步）。",
        "源图像与目标在同一批次中运行，所以任何采样器、CFG 和其他补丁都可以一起使用；一批多张图共用一个源图时只多算一行。",
        "`source_mode` 为 cache 时，同一源图的第二次及之后的运行（例如换目标提示词）复用缓存的源特征，不再计算源分支。",
    ],
    "PlugKitFeatureMap": [
        "把输出接到“预览图像”即可在运行时看到特征图；不连接的话 ComfyUI 不会执行它。",
        "用它比较不同块与步的特征，选择 Plug-and-Play 注入的块。",
    ],
    "PlugKitDifferentialDiffusion": [
        "把 `MODEL` 和 `LATENT` 两个输出接到同一个采样器。",
        "`schedule` 为 step 时复现官方规则；为 sigma 时与核心节点 DifferentialDiffusion 一致。",
        "论文：[arXiv 2306.00950](https://arxiv.org/abs/2306.00950) · 官方代码：[exx8/differential-diffusion](https://github.com/exx8/differential-diffusion)",
    ],
    "PlugKitChangeMap": [
        "约定：白 = 变化，黑 = 保留（ComfyUI 的约定）；官方代码的约定相反，可在差分扩散节点的 `map_convention` 中选择。",
        "`preview` 输出是变化图的灰度图，可接到“预览图像”查看。",
    ],
    "PlugKitDiffPluginSampler": [
        "用法：“应用 Diff-Plugin 任务插件” → SamplerCustom（`model`、`positive`、`latent_image` 来自应用节点；`negative` 任意；**cfg 1.0**；"
        "开启 `add_noise`；`noise_seed` 即 infer.py 的 `--seed`），配合本采样器与“Diff-Plugin 官方 Sigmas”（20 步）。输出即相同噪声下 infer.py 的潜空间。",
        "起始潜空间同 infer.py：图像潜空间加噪到 t = 999（latent + sigma · noise；ComfyUI 自己的采样器从 latent + sqrt(1 + sigma²) · noise 开始），"
        "并在**每个** t ≥ 960 的步用加噪的输入替换潜空间（20 步时为 t = 999；26 步时为 999 和 961；50 步时为 999 和 979）。不修改 ComfyUI 的采样器列表。",
        "噪声来自 SamplerCustom（关闭 `add_noise` 即零噪声）。其他 sigma 也可用（任何递减且结束于 0 以上的网格），但只有官方 sigma 给出官方结果。",
        "论文：[arXiv 2403.00644](https://arxiv.org/abs/2403.00644) · 官方代码：[yuhaoliu7456/Diff-Plugin](https://github.com/yuhaoliu7456/Diff-Plugin)",
    ],
    "PlugKitDiffPluginSigmas": [
        "时间步为 diffusers UniPC 的网格 `linspace(0, 999, steps + 1)` 取整、反转、去掉 0（20 步：t = 999, 949, 899, …, 50），"
        "再加上官方最后一步结束处的 t = 0；每个 t 换算为模型的 sigma。",
        "最后一个 sigma 是 sigma(t = 0) ≈ 0.029，而不是 0：ComfyUI 自己的采样器可能以不同方式处理最后一步；请配合“Diff-Plugin 官方采样器”使用。",
        "论文：[arXiv 2403.00644](https://arxiv.org/abs/2403.00644) · 官方代码：[yuhaoliu7456/Diff-Plugin](https://github.com/yuhaoliu7456/Diff-Plugin)",
    ],
    "PlugKitFeatureSegment": [
        "对每张图像运行与训练相同的特征流程（步、块、固定噪声、条件），集成中的每个分类器为每个像素打标签，多数投票即分割结果。",
        "`mask` 可接到“变化图”（在那里模糊）和“差分扩散”，或用于重绘。`model` 为其他系列、`vae` 的潜空间通道数不同时会被拒绝。",
        "预测在图像分辨率上进行：每个分类器的第一层作用于潜空间分辨率的特征，再把其输出双线性上采样，"
        "与官方“先上采样特征、再对每个像素分类”完全相同，内存少 80 倍。",
        "论文：[arXiv 2112.03126](https://arxiv.org/abs/2112.03126) · 官方代码：[yandex-research/ddpm-segmentation](https://github.com/yandex-research/ddpm-segmentation)",
    ],
    "PlugKitFeatureSegmenterTrain": [
        "图像被编码、用同一固定噪声加噪到几个固定的噪声步，每步通过 U-Net 一次，所选解码器块的输出成为每个潜空间单元的特征向量；"
        "在这些特征上训练一组小型 MLP 像素分类器。只需在两三张图像上绘制遮罩，即可用“特征分割”分割整个批次或视频的每一帧。",
        "标签图的类别按颜色的 (R, G, B) 顺序编号，所以黑色是类别 0。图像至少 64 像素。",
        "特征内存：每个潜空间单元 steps x（各块通道数之和）个 float32 值；SD1.5 默认设置下为 3 x 3520 = 10560 个，每张 512 像素图像 173 MiB。",
        "模型会被克隆；输入的 MODEL 不会被修改。",
        "论文：[arXiv 2112.03126](https://arxiv.org/abs/2112.03126) · 官方代码：[yandex-research/ddpm-segmentation](https://github.com/yandex-research/ddpm-segmentation)",
    ],
    "PlugKitLoadSegmenter": [
        "从 `ComfyUI/models/plugkit_segmenters/`（或 `extra_model_paths.yaml` 中 `plugkit_segmenters:` 指定的任何文件夹）加载“保存分割器”保存的分割器。"
        "保存后刷新页面即可在列表中看到新文件。文件夹以外的名称会被拒绝。",
        "把输出接到“特征分割”，并使用训练它时的模型和 VAE。",
    ],
    "PlugKitSaveSegmenter": [
        "保存为一个 `.safetensors` 文件（分类器权重、特征流程、调色板和条件），位于 `ComfyUI/models/plugkit_segmenters/`。",
        "`..`、绝对路径和盘符会被拒绝；写入是原子操作。",
    ],
}
