"""Registers `optimum-cli agentos ...` (the `optimum-agentos` commands) through optimum's command namespace.

optimum imports every module of the `optimum.commands.register` namespace when `optimum-cli` starts, so this file
stays light: optimum_agentos is imported only when the command runs or its parser is built.
"""

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class AgentOSCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="agentos", help="optimum-agentos: quantize, prune, distill, eval, card, push, run.")

    @staticmethod
    def parse_args(parser):
        from optimum_agentos.cli import add_subcommands

        add_subcommands(parser)

    def run(self):
        from optimum_agentos.cli import run_command

        code = run_command(self.args)
        if code:
            raise SystemExit(code)


REGISTER_COMMANDS = [AgentOSCommand]
