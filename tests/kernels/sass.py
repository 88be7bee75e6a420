"""The SASS opcodes of one ahead-of-time build, for tests that read instruction order.

    python -m tests.kernels.sass OP PASS KERNEL ARCH [CONFIG_JSON]

prints, as JSON, the opcodes of the first fp16 build of ``OP`` (gpt2 workload) whose pass
and kernel name match and whose config contains CONFIG_JSON's items. It compiles real JIT
kernels, so it runs without TRITON_INTERPRET (``opcodes`` starts it that way)."""

import json
import os
import subprocess
import sys


def opcodes(op: str, pass_: str, kernel: str, arch: str, config: dict) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "tests.kernels.sass", op, pass_, kernel, arch, json.dumps(config)],
                            capture_output=True, text=True, env=env, timeout=600, check=True)
    return json.loads(result.stdout)


def main(op: str, pass_: str, kernel: str, arch: str, config: str = "{}") -> None:
    from fusedgpt.kernels import compile_report as cr

    wanted = json.loads(config)
    variant = next(
        v for v in cr.variants([op], ["fp16"])
        if v.pass_ == pass_ and cr.python_function(v.kernel).__name__ == kernel and (not v.archs or arch in v.archs)
        and all(v.config.get(name) == value for name, value in wanted.items())
    )
    compiled = cr.compile_specialised(cr.specialise(variant, arch), variant, arch)
    sass = cr.cubin_contents(compiled.asm["cubin"])[1]
    print(json.dumps([opcode for _, opcode, _ in cr.parse_sass(sass)]))


if __name__ == "__main__":
    main(*sys.argv[1:])
