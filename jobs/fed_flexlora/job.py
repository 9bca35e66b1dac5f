"""fed_flexlora: a FedMed federation (fed_exact_lora) as a FLARE recipe.

Run it in FLARE's simulator, POC mode or a provisioned production system:

    python job.py --data SITES_ROOT [--sites site-1,site-2] [--rounds N] ...   # SimEnv
    python job.py --env poc --data SITES_ROOT                                  # PocEnv
    python job.py --env prod --startup-kit /path/to/admin@org                  # ProdEnv
    python job.py --export --export-dir DIR    # write DIR/fed_flexlora/ for nvflare job submit

SITES_ROOT/<site name>/ holds each site's notes (train.jsonl, ...). `python job.py --help`
lists every option; each one given replaces the value below.
Written by FedMedRecipe.export (fedmed_components/flare/recipe.py); `--export` rewrites it.
"""

from fedmed_components.commands.recipe_job import parse_job_args, run_recipe
from fedmed_components.flare.recipe import FedMedRecipe

args = parse_job_args(__doc__)
recipe = FedMedRecipe(
    **args.settings(
        name="fed_flexlora",
        algorithm="fed_exact_lora",
        sites=['site-1', 'site-2', 'site-3'],
        site_overrides={'site-1': {'rank': '4'}, 'site-2': {'rank': '8'}},
    )
)
raise SystemExit(run_recipe(recipe, args))
