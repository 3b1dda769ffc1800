"""
The same workloads as bench.py through Hugging Face transformers and TRL, for the ratios of its table
(imported only there; neither package is needed to run anything else). bench_trl times TRL's PPO
steps, with our iteration run between them so both see the same machine.
"""
import os
import statistics
import time

import torch

from util import timed


def bench_hf(cfg, bc, batches, device, ctx, results):
    """transformers' GPT2LMHeadModel at bench.py's settings: an SFT step (its own causal-LM loss, AdamW)
    and sampling with generate() at each batch size, into results (nothing without transformers)."""
    try:
        import transformers
    except ImportError:
        print("transformers not installed: no comparison")
        return
    hcfg = transformers.GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size,
                                   n_positions=cfg.block_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # as ours
    hf = transformers.GPT2LMHeadModel(hcfg).to(device)
    x = torch.randint(0, cfg.vocab_size, (bc.sft_batch, bc.sft_len), device=device)
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)

    def step():
        with ctx:
            loss = hf(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    results["hf_sft"] = dict(step_s=timed(step, bc.reps, device))
    results["hf_sft"]["tok_s"] = bc.sft_batch * bc.sft_len / results["hf_sft"]["step_s"]
    hf.eval()
    for B in batches:
        prompt = torch.randint(0, cfg.vocab_size, (B, bc.prompt_len), device=device)

        def gen():
            with ctx, torch.no_grad():
                hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0,
                            max_new_tokens=bc.new_tokens, min_new_tokens=bc.new_tokens, pad_token_id=0)
        s = timed(gen, bc.reps, device)
        results[f"hf_generate_b{B}"] = dict(tok_s=B * bc.new_tokens / s, ms_per_step=1000 * s / bc.new_tokens)


def bench_trl(cfg, bc, device, results, between=None):
    """One TRL PPO iteration at bench_ppo's settings: policy, reference, and separate reward and value
    models (GPT2ForSequenceClassification), one epoch, two minibatches; between() runs (untimed) after
    each of TRL's steps. False if TRL with PPO is not installed: PPO left TRL's main package after
    1.12, `pip install trl==1.12.0` has it as trl.experimental.ppo."""
    try:
        import datasets
        import transformers
        from tokenizers import Tokenizer, models
        try:
            from trl.experimental.ppo import PPOConfig, PPOTrainer
        except ImportError:
            from trl import PPOConfig, PPOTrainer
    except ImportError:
        print("no TRL with PPO installed (pip install trl==1.12.0): no PPO comparison")
        return False
    eot = cfg.vocab_size - 1
    tk = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<|endoftext|>": eot}, "<|endoftext|>")),
                                              eos_token="<|endoftext|>", pad_token="<|endoftext|>")  # TRL needs pad/eos ids only
    hcfg = transformers.GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size,
                                   n_positions=cfg.block_size, pad_token_id=eot, eos_token_id=eot, num_labels=1)
    lm, head = transformers.GPT2LMHeadModel, transformers.GPT2ForSequenceClassification
    prompts = torch.randint(0, eot, (bc.ppo_prompts, bc.ppo_prompt_len)).tolist()
    stamps = []  # (TRL's step ended, `between` ended)

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            t = time.perf_counter()
            if between is not None:
                between()
            stamps.append((t, time.perf_counter()))
    args = PPOConfig(output_dir=os.path.join("out", "bench_trl"), per_device_train_batch_size=bc.ppo_prompts,
                     num_mini_batches=2, num_ppo_epochs=1, response_length=bc.ppo_new_tokens,
                     total_episodes=bc.ppo_prompts * (bc.reps + 1), report_to="none", save_strategy="no",
                     num_sample_generations=0, use_cpu=device == "cpu", bf16=bc.dtype == "bfloat16", disable_tqdm=True)
    trainer = PPOTrainer(args=args, processing_class=tk, model=lm(hcfg), ref_model=lm(hcfg), reward_model=head(hcfg),
                         value_model=head(hcfg), train_dataset=datasets.Dataset.from_dict({"input_ids": prompts}),
                         callbacks=[Clock()])
    trainer.remove_callback(transformers.PrinterCallback)  # its metrics dict every step
    trainer.train()
    # TRL's step i runs from the end of `between` after step i-1 to the end of step i; step 0 is warm-up
    iters = [b[0] - a[1] for a, b in zip(stamps, stamps[1:])]
    results["trl_ppo"] = dict(iter_s=statistics.median(iters), iters_s=[round(t, 3) for t in iters])
    return True
