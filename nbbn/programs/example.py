"""A NumPy pipeline calling BatchNorm forward and backward: ``python -m nbbn example``."""
import numpy as np

import nbbn


def main():
    rng = np.random.default_rng(0)
    bn = nbbn.BatchNorm(16)                                   # like torch.nn.BatchNorm2d(16)
    for step in range(5):
        z = rng.standard_normal((32, 16, 8, 8)).astype(np.float32)
        x = 3 * z + 5                                         # data with mean 5, std 3
        target = 2 * z + 1 + 0.1 * rng.standard_normal(z.shape).astype(np.float32)
        y = bn(x)                                             # training forward
        loss = float(((y - target) ** 2).mean())
        dx = bn.backward(2 * (y - target) / y.size)           # sets grad_gamma, grad_beta
        bn.gamma -= 8 * bn.grad_gamma                         # plain SGD on gamma and beta
        bn.beta -= 8 * bn.grad_beta
        print(f"step {step}: loss {loss:.4f}, |dx| {np.abs(dx).max():.2e}")
    bn.eval()
    y = bn(x)                                                 # eval: running statistics
    print("gamma", bn.gamma[:3], "beta", bn.beta[:3], "(heading for 2 and 1)")
    print("running mean", bn.running_mean[:3], "running var", bn.running_var[:3])
    print("state_dict keys", sorted(bn.state_dict()))
    return 0


if __name__ == "__main__":
    main()
