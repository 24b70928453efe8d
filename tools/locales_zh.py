"""The Chinese (简体中文) texts of PlugKit's nodes: the source ``tools.locales`` builds
``locales/zh/nodeDefs.json`` and ``locales/zh/main.json`` from, together with the live schemas.

One entry per node id: ``display_name``, ``description``, ``inputs`` {input id: (name, tooltip)},
``outputs`` [(name, tooltip)] in output order. When a node gains an input or output, add its texts
here and run ``.venv/bin/python -m tools.locales``; the zh test fails while an entry is missing.
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
}

_MODEL_UNET = ("模型", "U-Net 模型（SD1.x、SD2.x、SDXL、SVD 等）。Flux、SD3 等 DiT 模型会被拒绝。")
_PLUGIN = ("插件", "来自“加载 Diff-Plugin 任务插件”的任务插件。")
_CLIP_VISION = ("CLIP视觉", "CLIP ViT-L/14 视觉模型（核心节点“加载CLIP视觉”），如 clip-vit-large-patch14.safetensors。")
_VAE = ("VAE", "SD 1.x 的 VAE。")
_CANDIDATE = "候选任务插件 {i}（顺序即选中插件的执行顺序）。"

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
            "preset": ("预设", "'custom' 使用上面的 b1/b2/s1/s2；命名预设使用论文公布的数值；'auto' 按模型系列自动选择。"),
            "threshold": ("阈值", "被 s1/s2 缩放的低频方框的半宽（1 = 官方的 2x2 方框）。"),
            "threshold_mode": ("阈值模式", "'fixed'：各尺寸下方框都是 threshold 个频点（官方）。'resolution-aware'：方框随图像增大，"
                                          "使各分辨率过滤的频带与模型原生分辨率下相同。"),
            "apply_to": ("作用于", "FreeU 作用于正向（cond）、负向（uncond）或两者（官方）。"),
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
        "description": "把退化图像变为任务插件的条件：Fp（TPB 输出）作为上下文，SCB 作为控制附加；请用 cfg 1 采样。",
        "inputs": {
            "model": ("模型", "SD 1.x 模型（Diff-Plugin 在 SD 1.4 上训练）。克隆后原样返回。"),
            "plugin": _PLUGIN,
            "clip_vision": _CLIP_VISION,
            "vae": ("VAE", "SD 1.x 的 VAE；为 SCB 和起始潜空间编码退化图像。"),
            "image": ("图像", "退化图像。官方插件期望短边约 512 像素；宽高会裁剪为 8 的倍数。"),
            "strength": ("强度", "SCB 残差的缩放（1.0 = 官方流程）。"),
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
        "description": "按官方流程依次应用选中的任务插件：第一个插件完整步数，之后每个插件在上一结果上运行少量步数（cfg 1）。",
        "inputs": {
            "model": ("模型", "SD 1.x 模型。"),
            "clip_vision": ("CLIP视觉", "CLIP ViT-L/14 视觉模型。"),
            "vae": _VAE,
            "image": ("图像", "退化图像。"),
            "seed": ("种子", "噪声种子（官方演示使用 42）。"),
            "steps": ("步数", "第一个插件的步数（官方：20）。"),
            "later_steps": ("后续步数", "之后每个插件的步数（官方：3）。"),
            "sampler_name": ("采样器", "official：与官方流程完全相同的采样（diffusers 的 UniPC，bh2，二阶，时间步 t = 999, 949, …，"
                                       "含其起始与最终潜空间；不使用 scheduler）。其他为 ComfyUI 的采样器配合 scheduler：接近官方结果，但不完全相同。"),
            "scheduler": ("调度器", "ComfyUI 采样器的 sigma 调度（official 采样器有自己的调度）。"),
            "plugins": ("插件列表", "来自“Diff-Plugin 插件选择器”的选中插件，按顺序运行。"),
            "plugin": ("插件", "或来自“加载 Diff-Plugin 任务插件”的单个插件（两者都连接时在 plugins 之后运行）：即该插件的官方结果。"),
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
            "batch_size": ("批次大小", "每步的图像对数量。"),
            "learning_rate": ("学习率", "AdamW 学习率（官方：1e-5，权重衰减 1e-2）。"),
            "save_every": ("保存间隔", "每 N 步保存一次插件（0：只在结束时保存）。保存是原子操作。"),
            "seed": ("种子", "噪声与时间步的种子。"),
            "resume": ("继续训练", "如果该 plugin_name 已有保存，则从最后一次保存继续。"),
            "start": ("起点", "使用该插件采样时的起点：加噪的输入（大多数任务）或纯噪声（如 lowlight / highlight）。"),
        },
        "outputs": [("插件", "训练得到的任务插件。"), ("报告", "训练摘要（步数、损失、保存位置）。")],
    },
    "PlugKitPnPInvert": {
        "display_name": "Plug-and-Play 反演 (PlugKit)",
        "description": "对源图像做确定性的 DDIM 反演（Plug-and-Play，Tumanyan 等 2023）。把 PNP_SOURCE 接到“Plug-and-Play 注入”，"
                       "把 LATENT 接到 KSampler（高级）（关闭 add_noise，步数与调度器相同）。",
        "inputs": {
            "model": ("模型", "用于反演和采样的 U-Net 模型（SD1.x、SD2.x 或 SDXL）。"),
            "samples": ("潜空间", "VAE 编码后的源图像（VAE 编码）。"),
            "conditioning": ("条件", "反演提示词。官方默认是空提示词：文本为空的 CLIP 文本编码。"),
            "steps": ("步数", "将使用此源的采样步数（官方代码用 50）。采样器中请使用相同的步数。"),
            "inversion_steps": ("反演步数", "反演精度：用于反演的模型评估次数（取整为 steps 的倍数）。越多重建越好、越慢。官方代码用 999。"),
            "scheduler": ("调度器", "采样器的调度器。ddim_uniform 配合 ddim 采样器复现官方方法；其他调度器也可用（不在该调度上的 sigma 会插值）。"),
        },
        "outputs": [("PNP源", "反演得到的源轨迹及其条件，用于“Plug-and-Play 注入”和“特征图”。"),
                    ("潜空间", "第一个采样步的反演潜空间：关闭 add_noise 对它采样。")],
    },
    "PlugKitPnPInject": {
        "display_name": "Plug-and-Play 注入 (PlugKit)",
        "description": "采样时源图像在同一批次中运行；在前若干步中，用源的解码器 ResBlock 特征和自注意力 q/k 替换目标的。"
                       "适用于任何采样器、CFG 和其他补丁。",
        "inputs": {
            "model": ("模型", "用于采样的 U-Net 模型（与反演时同一系列）。"),
            "pnp_source": ("PNP源", "来自“Plug-and-Play 反演”。"),
            "feature_injection": ("特征注入", "注入解码器 ResBlock 特征的前段采样步比例（官方 0.8）。越高保留越多结构。"),
            "attention_injection": ("注意力注入", "注入自注意力 q 和 k 的前段采样步比例（官方 0.5）。越高保留越多布局与外观。"),
            "feature_blocks": ("特征块", "高级：注入其第一个 ResBlock 的解码器（输出）块，如 '4' 或 '4, 5'。留空：按模型系列默认（SD1.x/2.x：4，SDXL：1）。"),
            "attention_blocks": ("注意力块", "高级：注入自注意力 q/k 的解码器块，如 '4-11'。留空：按模型系列默认（SD1.x/2.x：4-11，SDXL：1-5）；'none' 关闭。"),
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
            "step": ("步", "源调度中的采样步（0 = 噪声最大的一步，即注入开始处）。"),
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
            "schedule": ("调度", "sigma：ComfyUI 核心的规则（阈值与模型时间步成线性）。step：官方规则（保留值为 k 的像素在 N 步中的前 k*N 步保持不变）。"),
            "exact_keep": ("严格保留", "仅 sigma 调度：即使调度器结束于模型最小 sigma（normal、karras），最后一步也不释放变化值为 0 的像素。关闭时与核心完全一致。"),
        },
        "outputs": [("模型", "带差分扩散遮罩调度的模型。"), ("潜空间", "附加了变化图作为噪声遮罩的潜空间（白 = 变化，潜空间尺寸）。")],
    },
    "PlugKitChangeMap": {
        "display_name": "变化图 (PlugKit)",
        "description": "把图像（渐变、深度图、手绘）或遮罩转换为差分扩散的变化图。",
        "inputs": {
            "channel": ("通道", "哪个图像值成为变化图：亮度（Rec. 709）、单个通道或 RGB 平均。对遮罩无效。"),
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
}

# Extra notes of each node's Chinese help page (js/docs/<NodeId>/zh.md, written by tools.locales).
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
        "要得到与官方完全一致的结果，请把插件接到“运行 Diff-Plugin 插件链”的 `plugin` 输入：其默认的 `official` 采样器复现官方采样循环。",
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
        "与官方 `train.py` 相同：ε 的均方误差、均匀时间步、AdamW（权重衰减 1e-2）、梯度裁剪 1.0。",
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
        "源图像与目标在同一批次中运行，所以任何采样器、CFG 和其他补丁都可以一起使用。",
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
}
