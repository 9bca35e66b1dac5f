"""FedMed site script: what FLARE runs at each hospital (FLARE Client API).

The round: receive the global adapter, train QLoRA on local notes, measure validation
loss, send back only the adapter with the metadata the server's aggregation rule
needs (see fedmed_components/flare/site_tasks.py). The base model is loaded once and
kept across rounds.
"""

import argparse

import nvflare.client as flare
from nvflare.client.tracking import SummaryWriter

from fedmed_components.data.document import InputError
from fedmed_components.flare import site_tasks
from fedmed_components.flare.tracking import SiteTracker
from fedmed_components.model.site import SiteRuntime, add_site_arguments, site_config_from_args, site_data_folder


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    add_site_arguments(parser)
    site_tasks.add_site_script_arguments(parser)
    args = parser.parse_args()

    flare.init()
    site = flare.get_site_name()
    tracker = None if args.no_tensorboard else SiteTracker(SummaryWriter())  # the server's TensorBoard shows every site
    runtime = SiteRuntime(site_config_from_args(args), site_name=site)
    try:
        runtime.load_data(site_data_folder(args.data, site))
        error = None
    except InputError as exc:  # the reason goes to the server with every answer
        error = exc
        site_tasks.log.error("%s cannot take part: %s", site, exc)

    while flare.is_running():
        incoming = flare.receive()
        if incoming is None:
            break
        task = flare.get_task_name()
        flare.send(
            site_tasks.failed(site, error)
            if error
            else site_tasks.handle(runtime, task, incoming, send=args.send, tracker=tracker, keep_adapters=args.keep_local_adapters)
        )


if __name__ == "__main__":
    main()
