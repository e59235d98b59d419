"""What the model card says about each method: one paragraph in plain words and the paper's BibTeX.

:data:`METHODS` covers every objective of the registry (:func:`align.objectives.registry`) and every RL, online
and iterative method a recipe config can name; :func:`methods_of` picks the entries a run used. The formulas
themselves are in docs/methods.md; these paragraphs say what a reader of a model card needs to know.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    title: str  # the method's name as a heading
    paper: str | None  # the paper's title
    arxiv: str | None  # its arXiv id (YYMM.NNNNN), for a huggingface.co/papers link
    explanation: str  # one paragraph
    bibtex: str | None  # the paper's BibTeX entry


def _bib(kind: str, key: str, **fields: str) -> str:
    width = max(len(k) for k in fields)
    body = "\n".join(f"  {k:<{width}} = {{{v}}}," for k, v in fields.items())
    return f"@{kind}{{{key},\n{body}\n}}"


DPO_BIB = _bib(
    "inproceedings", "rafailov2023direct",
    title="{Direct Preference Optimization: Your Language Model is Secretly a Reward Model}",
    author="Rafael Rafailov and Archit Sharma and Eric Mitchell and Christopher D. Manning and Stefano Ermon and "
           "Chelsea Finn",
    booktitle="Advances in Neural Information Processing Systems 36 (NeurIPS 2023)", year="2023",
    eprint="2305.18290", archivePrefix="arXiv")
DAPO_BIB = _bib(
    "article", "yu2025dapo", title="{DAPO: An Open-Source LLM Reinforcement Learning System at Scale}",
    author="Qiying Yu and Zheng Zhang and Ruofei Zhu and Yufeng Yuan and Xiaochen Zuo and Yu Yue and others",
    journal="arXiv preprint arXiv:2503.14476", year="2025", eprint="2503.14476", archivePrefix="arXiv")
ENTANGLEMENT_BIB = _bib(
    "article", "yuan2024common",
    title="{A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement}",
    author="Hui Yuan and Yifan Zeng and Yue Wu and Huazheng Wang and Mengdi Wang and Liu Leqi",
    journal="arXiv preprint arXiv:2410.13828", year="2024", eprint="2410.13828", archivePrefix="arXiv")
TRL_BIB = _bib(
    "software", "vonwerra2020trl", title="{TRL: Transformers Reinforcement Learning}",
    author="von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and "
           "Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallou{\\'e}dec, Quentin",
    license="Apache-2.0", url="https://github.com/huggingface/trl", year="2020")

METHODS: dict[str, Method] = {
    "sft": Method(
        "SFT (supervised fine-tuning)", None, None,
        "The model learns to reproduce reference completions by maximising their likelihood (cross-entropy on the "
        "completion tokens for prompt/completion rows, on every token for plain text), with TRL's SFTTrainer. It is "
        "usually the first stage of post-training: it gives the policy the format and style that preference or RL "
        "training then starts from.", None),
    "dpo": Method(
        "DPO (Direct Preference Optimization)",
        "Direct Preference Optimization: Your Language Model is Secretly a Reward Model", "2305.18290",
        "DPO learns from pairs of responses to one prompt, one preferred (chosen) and one dispreferred (rejected), "
        "without a separate reward model or an RL loop. The policy's log-probability ratio to a frozen reference "
        "model plays the part of the reward, and the loss is a logistic (Bradley-Terry) loss on how much larger that "
        "implicit reward is for the chosen response than for the rejected one, scaled by beta; a larger beta keeps "
        "the policy closer to the reference.", DPO_BIB),
    "ipo": Method(
        "IPO (Identity Preference Optimisation)",
        "A General Theoretical Paradigm to Understand Learning from Human Preferences", "2310.12036",
        "IPO replaces DPO's logistic loss by a squared loss that pulls the gap between the chosen and the rejected "
        "log-ratio towards a fixed target, 1/(2 beta), instead of pushing it up without bound. This guards against "
        "the over-fitting DPO shows on preferences that look deterministic. align, like TRL, uses token-mean "
        "(length-normalised) log-ratios, so beta is on a per-token scale.",
        _bib("inproceedings", "azar2024general",
             title="{A General Theoretical Paradigm to Understand Learning from Human Preferences}",
             author="Mohammad Gheshlaghi Azar and Zhaohan Daniel Guo and Bilal Piot and R{\\'e}mi Munos and Mark "
                    "Rowland and Michal Valko and Daniele Calandriello",
             booktitle="Proceedings of The 27th International Conference on Artificial Intelligence and Statistics "
                       "(AISTATS 2024)", series="Proceedings of Machine Learning Research", volume="238",
             year="2024", eprint="2310.12036", archivePrefix="arXiv")),
    "hinge": Method(
        "Hinge loss (SLiC-HF)", "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", "2305.10425",
        "The hinge loss of sequence likelihood calibration, applied to DPO's reference-relative margin: a pair "
        "contributes a loss that falls linearly as the policy's margin grows, and nothing once beta times the margin "
        "exceeds 1, so pairs the policy already separates well stop pulling on it.",
        _bib("article", "zhao2023slic", title="{SLiC-HF: Sequence Likelihood Calibration with Human Feedback}",
             author="Yao Zhao and Rishabh Joshi and Tianqi Liu and Misha Khalman and Mohammad Saleh and Peter J. Liu",
             journal="arXiv preprint arXiv:2305.10425", year="2023", eprint="2305.10425", archivePrefix="arXiv")),
    "robust": Method(
        "Robust DPO", "Provably Robust DPO: Aligning Language Models with Noisy Feedback", "2403.00409",
        "Robust DPO assumes each preference label was flipped with a known probability epsilon (`label_smoothing`) "
        "and corrects DPO's loss for it: the loss on the given label and the loss on the flipped label are combined "
        "and divided by 1 - 2 epsilon, which in expectation equals the loss on clean labels.",
        _bib("inproceedings", "chowdhury2024provably",
             title="{Provably Robust DPO: Aligning Language Models with Noisy Feedback}",
             author="Sayak Ray Chowdhury and Anush Kini and Nagarajan Natarajan",
             booktitle="Proceedings of the 41st International Conference on Machine Learning (ICML 2024)",
             year="2024", eprint="2403.00409", archivePrefix="arXiv")),
    "rpo": Method(
        "RPO (Regularized Preference Optimization)",
        "Provably Mitigating Overoptimization in RLHF: Your SFT Loss is Implicitly an Adversarial Regularizer",
        "2405.16436",
        "RPO adds a supervised term, the negative log-likelihood of the chosen response weighted by eta, to the DPO "
        "loss. The paper derives this term as what a pessimistic, adversarially chosen reward penalty becomes under "
        "DPO's reparameterisation, a guard against over-optimising an imperfectly learned preference; in practice "
        "it keeps the chosen responses' likelihood from collapsing. `sft_norm` selects the summed, per-answer mean "
        "or batch token-mean form of the term.",
        _bib("inproceedings", "liu2024provably",
             title="{Provably Mitigating Overoptimization in RLHF: Your SFT Loss is Implicitly an Adversarial "
                   "Regularizer}",
             author="Zhihan Liu and Miao Lu and Shenao Zhang and Boyi Liu and Hongyi Guo and Yingxiang Yang and Jose "
                    "Blanchet and Zhaoran Wang",
             booktitle="Advances in Neural Information Processing Systems 37 (NeurIPS 2024)", year="2024",
             eprint="2405.16436", archivePrefix="arXiv")),
    "hdpo": Method(
        "H-DPO (entropy-controllable DPO)", "Entropy Controllable Direct Preference Optimization", "2411.07595",
        "H-DPO splits DPO's reverse-KL regulariser into an entropy term and a cross-entropy term and weights the "
        "entropy term by alpha. In the loss this scales the policy's log-probabilities by alpha while the "
        "reference's stay as they are: alpha = 1 is DPO, alpha < 1 trains a sharper, lower-entropy policy that "
        "seeks the reference's modes (the paper reports better pass@k on math), alpha > 1 a flatter one. align's "
        "loss is its reconstruction of the paper's derivation (docs/methods.md section 4).",
        _bib("article", "omura2024entropy", title="{Entropy Controllable Direct Preference Optimization}",
             author="Motoki Omura and Yasuhiro Fujita and Toshiki Kataoka",
             journal="arXiv preprint arXiv:2411.07595", year="2024", eprint="2411.07595", archivePrefix="arXiv")),
    "lrdpo": Method(
        "Length-regularised DPO (iLR-DPO)",
        "Iterative Length-Regularized Direct Preference Optimization: A Case Study on Improving 7B Language Models "
        "to GPT-4 Level", "2406.11817",
        "Length-regularised DPO adds a length margin to DPO's logit, `length_alpha` times the difference in tokens "
        "between the chosen and the rejected response. The part of a preference that a length difference explains "
        "then no longer has to be learned by the policy, which keeps it from drifting towards longer answers; "
        "iLR-DPO uses this loss in every round of iterative DPO, where verbosity otherwise grows.",
        _bib("article", "liu2024iterative",
             title="{Iterative Length-Regularized Direct Preference Optimization: A Case Study on Improving 7B "
                   "Language Models to GPT-4 Level}",
             author="Jie Liu and Zhanhui Zhou and Jiaheng Liu and Xingyuan Bu and Chao Yang and Han-Sen Zhong and "
                    "Wanli Ouyang",
             journal="arXiv preprint arXiv:2406.11817", year="2024", eprint="2406.11817", archivePrefix="arXiv")),
    "online_ipo": Method(
        "Online IPO", "Human Alignment of Large Language Models through Online Preference Optimisation",
        "2403.08635",
        "Online IPO applies IPO's squared loss to pairs the current policy samples, with a soft target from a "
        "preference model: the difference of the two responses' win probabilities (over beta) rather than a 0/1 "
        "label. Calandriello et al. show that with such online data IPO finds the Nash equilibrium of the "
        "preference game by self-play; EGPO follows the gradients of this loss.",
        _bib("inproceedings", "calandriello2024human",
             title="{Human Alignment of Large Language Models through Online Preference Optimisation}",
             author="Daniele Calandriello and Daniel Guo and R{\\'e}mi Munos and Mark Rowland and Yunhao Tang and "
                    "Bernardo Avila Pires and Pierre Harvey Richemond and Charline Le Lan and Michal Valko and "
                    "Tianqi Liu and Rishabh Joshi and Zeyu Zheng and Bilal Piot",
             booktitle="Proceedings of the 41st International Conference on Machine Learning (ICML 2024)",
             year="2024", eprint="2403.08635", archivePrefix="arXiv")),
    "pairnorm": Method(
        "Pairwise-normalised DPO (gradient entanglement mitigation)",
        "A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement", "2410.13828",
        "Margin losses such as DPO only ask the chosen response to gain on the rejected one; because the two "
        "responses' gradients overlap, both log-probabilities often rise or fall together. This objective keeps "
        "DPO's per-pair weight but steps along the difference of the normalised gradients, g_w/|g_w| - g_l/|g_l|, so "
        "to first order the chosen log-probability cannot fall nor the rejected one rise. The formula is align's "
        "working reading of the paper's proposal.", ENTANGLEMENT_BIB),
    "entanglement": Method(
        "Gradient-entanglement monitor",
        "A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement", "2410.13828",
        "During training align measured, on fixed probe pairs, the inner product and the norms of the chosen and "
        "rejected log-probability gradients, and counted the pairs for which a margin-loss step lowers (or raises) "
        "both log-probabilities: the failure mode the paper calls gradient entanglement.", ENTANGLEMENT_BIB),
    "grpo": Method(
        "GRPO (Group Relative Policy Optimization)",
        "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models", "2402.03300",
        "GRPO samples a group of completions for every prompt, scores each with the reward functions, and uses a "
        "completion's reward relative to its group (centred and, by default, divided by the group's standard "
        "deviation) as the advantage of all its tokens. The policy is updated with PPO's clipped surrogate and no "
        "value network; an optional KL penalty (beta) keeps it near a reference. align computes advantages by group, "
        "so groups may have different sizes.",
        _bib("article", "shao2024deepseekmath",
             title="{DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models}",
             author="Zhihong Shao and Peiyi Wang and Qihao Zhu and Runxin Xu and Junxiao Song and Xiao Bi and Haowei "
                    "Zhang and Mingchuan Zhang and Y. K. Li and Y. Wu and Daya Guo",
             journal="arXiv preprint arXiv:2402.03300", year="2024", eprint="2402.03300", archivePrefix="arXiv")),
    "dapo": Method(
        "DAPO (Decoupled Clip and Dynamic sAmpling Policy Optimization)",
        "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", "2503.14476",
        "DAPO's refinements of GRPO for long reasoning, as far as this run used them: the loss is a mean over all "
        "tokens of the optimizer step rather than per sequence (`loss_type: dapo`, align's default), the upper clip "
        "range may exceed the lower (`epsilon_high`), completions cut at the length limit may be left out of the loss "
        "(`mask_truncated_completions`), and the `overlong` reward penalises answers that run into the limit.",
        DAPO_BIB),
    "dynamic": Method(
        "Dynamic sampling (DAPO)", "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", "2503.14476",
        "Prompts whose completions all got the same reward have zero advantage and give no gradient. Dynamic "
        "sampling drops them and samples fresh prompts in their place (up to `dynamic_max_rounds` extra rounds), so "
        "that every update is made of informative groups.", DAPO_BIB),
    "dr_grpo": Method(
        "Dr. GRPO", "Understanding R1-Zero-Like Training: A Critical Perspective", "2503.20783",
        "Dr. GRPO removes two biases of GRPO's objective: dividing each completion's loss by its length, which "
        "favours long wrong answers, and dividing advantages by the group's reward standard deviation, which "
        "over-weights very easy and very hard prompts. In align: `scale_rewards: none` and `loss_type: dr_grpo` "
        "(token sums over a constant).",
        _bib("article", "liu2025understanding", title="{Understanding R1-Zero-Like Training: A Critical Perspective}",
             author="Zichen Liu and Changyu Chen and Wenjun Li and Penghui Qi and Tianyu Pang and Chao Du and Wee Sun "
                    "Lee and Min Lin",
             journal="arXiv preprint arXiv:2503.20783", year="2025", eprint="2503.20783", archivePrefix="arXiv")),
    "raft": Method(
        "RAFT (reward-ranked fine-tuning)", "RAFT: Reward rAnked FineTuning for Generative Foundation Model Alignment",
        "2304.06767",
        "RAFT samples several responses per prompt, keeps the ones the reward accepts (here: total reward above "
        "`accept_threshold`, e.g. a verified answer) and fine-tunes on them with the plain likelihood loss. As an "
        "advantage, an accepted sample counts 1 and a rejected one 0.",
        _bib("article", "dong2023raft", title="{RAFT: Reward rAnked FineTuning for Generative Foundation Model "
                                                "Alignment}",
             author="Hanze Dong and Wei Xiong and Deepanshu Goyal and Yihan Zhang and Winnie Chow and Rui Pan and "
                    "Shizhe Diao and Jipeng Zhang and Kashun Shum and Tong Zhang",
             journal="Transactions on Machine Learning Research", year="2023", eprint="2304.06767",
             archivePrefix="arXiv")),
    "raft++": Method(
        "RAFT++", "A Minimalist Approach to LLM Reasoning: from Rejection Sampling to Reinforce", "2504.11343",
        "RAFT++ keeps RAFT's 0/1 advantages (only accepted samples carry a gradient) but optimises them with the "
        "clipped, importance-weighted surrogate of PPO and GRPO, so several updates can safely reuse one round's "
        "samples. Xiong et al. find this rejection-sampling baseline competitive with GRPO.",
        _bib("article", "xiong2025minimalist",
             title="{A Minimalist Approach to LLM Reasoning: from Rejection Sampling to Reinforce}",
             author="Wei Xiong and Jiarui Yao and Yuhui Xu and Bo Pang and Lei Wang and Doyen Sahoo and Junnan Li and "
                    "Nan Jiang and Tong Zhang and Caiming Xiong and Hanze Dong",
             journal="arXiv preprint arXiv:2504.11343", year="2025", eprint="2504.11343", archivePrefix="arXiv")),
    "gvm": Method(
        "GVM (gradient-variance-minimising sample allocation)",
        "Optimizing Chain-of-Thought Reasoners via Gradient Variance Minimization in Rejection Sampling and RL",
        "2505.02391",
        "Instead of the same number of completions for every prompt, GVM shares a round's sampling budget out by "
        "prompt. From a few estimation samples it measures each prompt's acceptance rate p_i and gradient norm G_i, "
        "then gives it a share proportional to G_i / sqrt(p_i + alpha / p_i^(beta-1)), the allocation that minimises "
        "the variance of the gradient estimate for a fixed total; prompts never solved get nothing that round.",
        _bib("article", "yao2025optimizing",
             title="{Optimizing Chain-of-Thought Reasoners via Gradient Variance Minimization in Rejection Sampling "
                   "and RL}",
             author="Jiarui Yao and Yifan Hao and Hanning Zhang and Hanze Dong and Wei Xiong and Nan Jiang and Tong "
                    "Zhang",
             journal="arXiv preprint arXiv:2505.02391", year="2025", eprint="2505.02391", archivePrefix="arXiv")),
    "online_dpo": Method(
        "Online DPO", "Direct Language Model Alignment from Online AI Feedback", "2402.04792",
        "Online DPO draws its preference pairs from the policy being trained: for every prompt the current policy "
        "samples two responses, a preference oracle (a judge, a reward model or a verifier) picks the better one, "
        "and the pair is trained with a DPO-family loss at once, so the data always match the policy.",
        _bib("article", "guo2024direct", title="{Direct Language Model Alignment from Online AI Feedback}",
             author="Shangmin Guo and Biao Zhang and Tianlin Liu and Tianqi Liu and Misha Khalman and Felipe "
                    "Llinares and Alexandre Ram{\\'e} and Thomas Mesnard and Yao Zhao and Bilal Piot and Johan "
                    "Ferret and Mathieu Blondel",
             journal="arXiv preprint arXiv:2402.04792", year="2024", eprint="2402.04792", archivePrefix="arXiv")),
    "xpo": Method(
        "XPO (Exploratory Preference Optimization)",
        "Exploratory Preference Optimization: Harnessing Implicit Q*-Approximation for Sample-Efficient RLHF",
        "2405.21046",
        "XPO is online DPO plus one term: every prompt also gets a response sampled from the reference model, and "
        "the loss adds alpha times that response's log-probability under the policy. Minimising it moves probability "
        "away from what the reference would say, an optimism bonus that makes the policy explore beyond the "
        "reference's support.",
        _bib("inproceedings", "xie2025exploratory",
             title="{Exploratory Preference Optimization: Harnessing Implicit Q*-Approximation for Sample-Efficient "
                   "RLHF}",
             author="Tengyang Xie and Dylan J. Foster and Akshay Krishnamurthy and Corby Rosset and Ahmed Awadallah "
                    "and Alexander Rakhlin",
             booktitle="The Thirteenth International Conference on Learning Representations (ICLR 2025)",
             year="2025", eprint="2405.21046", archivePrefix="arXiv")),
    "egpo": Method(
        "EGPO (Extragradient Preference Optimization)",
        "Extragradient Preference Optimization (EGPO): Beyond Last-Iterate Convergence for Nash Learning from Human "
        "Feedback", "2503.08942",
        "EGPO looks for the Nash equilibrium of the KL-regularised game of preferences, which does not assume that "
        "preferences are transitive. Each update is an extragradient step on the online IPO loss: a half step from "
        "the current parameters on pairs the current policy samples, then a full step, again from the current "
        "parameters, with the gradient taken on pairs and preferences from the half-stepped policy. It converges in "
        "the last iterate, not only on average.",
        _bib("article", "zhou2025extragradient",
             title="{Extragradient Preference Optimization (EGPO): Beyond Last-Iterate Convergence for Nash Learning "
                   "from Human Feedback}",
             author="Runlong Zhou and Maryam Fazel and Simon S. Du", journal="arXiv preprint arXiv:2503.08942",
             year="2025", eprint="2503.08942", archivePrefix="arXiv")),
    "iterative_dpo": Method(
        "Iterative DPO",
        "Iterative Preference Learning from Human Feedback: Bridging Theory and Practice for RLHF under "
        "KL-Constraint", "2312.11456",
        "Iterative DPO alternates sampling and training. In each iteration the current policy samples several "
        "responses per prompt, an oracle ranks them, the best and the worst make a preference pair, and one round "
        "of a DPO-family loss trains on the pairs with the iteration's starting policy as the reference: the data "
        "follow the policy while every round stays a stable offline problem.",
        _bib("inproceedings", "xiong2024iterative",
             title="{Iterative Preference Learning from Human Feedback: Bridging Theory and Practice for RLHF under "
                   "KL-Constraint}",
             author="Wei Xiong and Hanze Dong and Chenlu Ye and Ziqi Wang and Han Zhong and Heng Ji and Nan Jiang and "
                    "Tong Zhang",
             booktitle="Proceedings of the 41st International Conference on Machine Learning (ICML 2024)",
             year="2024", eprint="2312.11456", archivePrefix="arXiv")),
    "apo": Method(
        "APO (Accelerated Preference Optimization)",
        "Accelerated Preference Optimization for Large Language Model Alignment", "2410.06293",
        "APO reads iterative DPO as a proximal-point method and adds Nesterov momentum between iterations: the next "
        "round's reference is the extrapolation (1 + alpha) log pi_t - alpha log pi_(t-1) of the last two policies "
        "(exact in align, as reference log-probabilities), which the paper shows converges faster than plain "
        "iterative DPO.",
        _bib("article", "he2024accelerated",
             title="{Accelerated Preference Optimization for Large Language Model Alignment}",
             author="Jiafan He and Huizhuo Yuan and Quanquan Gu", journal="arXiv preprint arXiv:2410.06293",
             year="2024", eprint="2410.06293", archivePrefix="arXiv")),
}


def methods_of(config) -> list[str]:
    """The :data:`METHODS` keys a run with ``config`` used, the main method first (an objective a later module
    registers without an entry here is returned too; the card then falls back to its registry summary)."""
    if hasattr(config, "advantage"):  # grpo, raft
        rl = config.advantage == "raft"
        found = ["raft++" if rl and config.policy_loss == "clip" else "raft" if rl else "grpo"]
        if config.loss_type == "dr_grpo" or config.scale_rewards == "none":
            found.append("dr_grpo")
        if (config.loss_type == "dapo" or config.epsilon_high is not None or config.mask_truncated_completions
                or "overlong" in config.reward_funcs):
            found.append("dapo")
        if config.allocator in ("gvm", "dynamic"):
            found.append(config.allocator)
        return found
    if hasattr(config, "iterations"):  # iterative_dpo
        return ["apo" if config.apo_alpha else "iterative_dpo", config.objective]
    if hasattr(config, "oracle"):  # online_dpo, xpo, egpo
        if config.method == "egpo":
            return ["egpo", "online_ipo"] if config.egpo_extragradient else ["online_ipo"]
        return [config.method, config.objective]
    if hasattr(config, "objective"):  # dpo
        watched = config.entanglement_steps or config.entanglement_action != "none"
        return [config.objective, *(["entanglement"] if watched else [])]
    return ["sft"]
