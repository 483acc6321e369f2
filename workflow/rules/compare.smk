rule fold:
    """Labels and chips (a region) or samples (a training set) of one fold of spatial
    cross-validation (compare.folds > 1)."""
    input:
        unpack(split_data),
    output:
        directory(f"{DATA}/{{region}}/folds/{{fold}}"),
    params:
        p=params_json("fold"),
    log:
        f"logs/{{region}}/compare/fold{{fold}}.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m cropmap fold --params {params.p:q} --inputs {input:q} --fold {wildcards.fold:q} --out-dir {output:q}"
        " --log {log:q}"


use rule train as train_compare with:
    input:
        unpack(fold_data),
        pretrained=lambda wc: pretrained_input(wc.method, wc.region, wc.task, wc.fold),
    output:
        ckpt=f"{MODELS}/{{region}}/compare/fold{{fold}}/{{method}}/{{task}}/model.ckpt",
        summary=f"{MODELS}/{{region}}/compare/fold{{fold}}/{{method}}/{{task}}/train_summary.json",
    params:
        p=lambda wc: dumps(stage_params(config, "train", wc.region, method=wc.method, fold=wc.fold)),
        work=f"{MODELS}/{{region}}/compare/fold{{fold}}/{{method}}/{{task}}/lightning",
    log:
        f"logs/{{region}}/compare/fold{{fold}}/train_{{method}}_{{task}}.log",


use rule metrics as metrics_compare with:
    input:
        unpack(fold_data),
        model=rules.train_compare.output.ckpt,
    output:
        metrics=f"{RESULTS}/compare/{{region}}/fold{{fold}}/{{method}}_{{task}}.csv",
        confusion=f"{RESULTS}/compare/{{region}}/fold{{fold}}/{{method}}_{{task}}_confusion.csv",
    params:
        p=params_json("metrics"),
        tags=lambda wc: ["--tag", f"region={wc.region}", "--tag", f"fold={wc.fold}", "--tag", f"method={wc.method}"],
    log:
        f"logs/{{region}}/compare/fold{{fold}}/metrics_{{method}}_{{task}}.log",


rule compare:
    """Target: results/compare/table.csv (method x subset), summary.csv and a heatmap."""
    input:
        expand(
            f"{RESULTS}/compare/{{region}}/fold{{fold}}/{{method}}_{{task}}.csv",
            region=compare_regions(config),
            fold=range(config["compare"]["folds"]),
            method=config["compare"]["methods"],
            task=compare_task(config),
        ),
    output:
        table=report(
            f"{RESULTS}/compare/table.csv",
            caption="../report/compare_table.rst",
            category="5. Method comparison",
            labels={"file": "table.csv"},
        ),
        summary=report(
            f"{RESULTS}/compare/summary.csv",
            caption="../report/compare_summary.rst",
            category="5. Method comparison",
            labels={"file": "summary.csv"},
        ),
        heatmap=report(
            f"{RESULTS}/compare/heatmap.png",
            caption="../report/compare_heatmap.rst",
            category="5. Method comparison",
            labels={"file": "heatmap.png"},
        ),
    log:
        "logs/compare.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m cropmap compare --parts {input:q} --table {output.table:q} --summary {output.summary:q}"
        " --heatmap {output.heatmap:q} --log {log:q}"
