"""Geometry of sampling and denoising trajectories (issue 30, items 1 and 2).

Points are float64 tensors [N, B, D]: N points along each of B trajectories in D dimensions.

- The chord frame: every trajectory's start-end direction plus the leading directions of what is
  orthogonal to it (`projection_basis`), the coordinates in it (`project`), and each point's
  distance from the chord (`line_deviation`).
- Frenet-Serret curvature kappa(s) and torsion tau(s) of a curve in 3-D, parametrised by arc length
  s, from a local polynomial fit over a window of points (`curvature_torsion`), and the total
  rotation of its Frenet frame, the integral of sqrt(kappa^2 + tau^2) ds (`total_rotation`): the
  length of the Darboux vector, the frame's angular speed per unit length.
- Orthogonal Procrustes (`procrustes`): the orthogonal map that best aligns one trajectory's
  coordinates with a reference's.
"""

import torch


# ----------------------------------------------------------------------------------------------
# The chord frame.

def line_deviation(points):
    """Distance of every point [N, B] from the straight line through the trajectory's first and
    last points. Zero at both ends by construction (up to round-off)."""
    rel = points - points[0]
    chord = rel[-1]
    u = chord / chord.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    along = (rel * u).sum(-1, keepdim=True)
    return (rel - along * u).norm(dim=-1)


def projection_basis(points, dims=3):
    """Per trajectory, an orthonormal basis [B, dims, D]: the unit start-end direction, then the
    dims - 1 leading singular directions of the deviation vectors (the component of x_i - x_0
    orthogonal to the chord). Not centered: the deviations are anchored at zero at both ends, and
    these are the directions that reconstruct them best. Also returns the share of the deviation's
    squared norm those directions carry [B] (1 = the trajectory lies in a dims-D subspace)."""
    rel = points - points[0]                                            # [N, B, D]
    chord = rel[-1]
    u = chord / chord.norm(dim=-1, keepdim=True).clamp_min(1e-300)      # [B, D]
    dev = rel - (rel * u).sum(-1, keepdim=True) * u
    extra = dims - 1
    bases, shares = [], []
    for b in range(points.shape[1]):
        _, s, vh = torch.linalg.svd(dev[:, b], full_matrices=False)   # vh [min(N, D), D]
        k = min(extra, vh.shape[0])
        pcs = vh[:k]
        if k < extra:
            pcs = torch.cat([pcs, torch.zeros(extra - k, pcs.shape[1], dtype=pcs.dtype)])
        # Directions with a zero singular value are arbitrary and need not be orthogonal to u:
        # orthonormalise [u, pc1, ...] (Householder QR stays orthonormal even when degenerate),
        # with signs that keep u and the leading directions as they were.
        q, r = torch.linalg.qr(torch.cat([u[b][None], pcs]).T)
        bases.append((q * torch.where(r.diagonal() < 0, -1.0, 1.0).to(q.dtype)).T)
        total = s.square().sum()
        shares.append(float(s[:extra].square().sum() / total) if total > 0 else 1.0)
    return torch.stack(bases), shares


def project(points, origin, basis):
    """Coordinates [N, B, k] of points [N, B, D] relative to origin [B, D] in basis [B, k, D]."""
    return torch.einsum('nbd,bkd->nbk', points - origin, basis)


def chord_coordinates(points, dims=3):
    """Each trajectory in its own chord frame: coordinates [N, B, dims] from its first point, and
    the share of its deviation the frame's dims - 1 deviation directions carry [B]."""
    basis, shares = projection_basis(points, dims)
    return project(points, points[0], basis), shares


# ----------------------------------------------------------------------------------------------
# Arc length, local polynomial fit, Frenet-Serret.

def arc_length(curve):
    """Cumulative length [N, ...] of the polyline through the points [N, ..., k] (0 at the first)."""
    steps = (curve[1:] - curve[:-1]).norm(dim=-1)
    return torch.cat([torch.zeros_like(steps[:1]), steps.cumsum(0)])


def local_derivatives(curve, s, window=7, degree=3):
    """First three derivatives [3, N, k] of the curve [N, k] with respect to the parameter s [N]
    (strictly increasing): at every point a least-squares polynomial of `degree` in s over the
    `window` nearest points in index (centered; shifted inward at the ends), differentiated at the
    point. The fit runs in u = (s - s_i) / h with h the window's span, for conditioning."""
    n = curve.shape[0]
    window = min(window, n)
    if window < degree + 1:
        raise ValueError(f'--window: a degree-{degree} fit needs at least {degree + 1} points (got {window})')
    out = torch.full((3,) + curve.shape, float('nan'), dtype=curve.dtype)
    for i in range(n):
        lo = min(max(i - window // 2, 0), n - window)
        ss, pts = s[lo:lo + window], curve[lo:lo + window]
        h = float(ss[-1] - ss[0])
        if not h > 0:
            continue
        u = (ss - s[i]) / h
        vander = torch.stack([u ** p for p in range(degree + 1)], dim=1)         # [window, degree + 1]
        coef = torch.linalg.lstsq(vander, pts).solution                          # [degree + 1, k]
        for order in range(1, 4):
            if order <= degree:   # d^m/ds^m of c_m u^m at u = 0 is m! c_m / h^m
                out[order - 1, i] = coef[order] * float(torch.arange(1, order + 1).prod()) / h ** order
            else:
                out[order - 1, i] = 0.0
    return out


def frenet(d1, d2, d3):
    """Curvature and torsion [N] from the first three derivatives [N, 3] of a curve (any
    parametrisation): kappa = |r' x r''| / |r'|^3, tau = (r' x r'') . r''' / |r' x r''|^2. Where the
    curve does not bend (|r' x r''| at round-off level) the osculating plane is undefined and tau is
    taken as 0: a straight piece does not twist."""
    cross = torch.linalg.cross(d1, d2, dim=-1)
    speed = d1.norm(dim=-1)
    bend = cross.norm(dim=-1)
    kappa = bend / speed.clamp_min(1e-300) ** 3
    flat = bend <= 1e-12 * speed * d2.norm(dim=-1)
    tau = torch.where(flat, torch.zeros_like(bend), (cross * d3).sum(-1) / bend.clamp_min(1e-300) ** 2)
    return kappa, tau


def curvature_torsion(curve, window=7, tol=1e-9):
    """Arc length s [N], curvature kappa(s) [N] and torsion tau(s) [N] of a curve [N, 3] (float64).
    Points that do not move the curve on (a step below `tol` of its length: a denoising trajectory
    that has settled) are left out of the fit, and get NaN curvature and torsion."""
    s = arc_length(curve)
    steps = torch.cat([s[:1] + 1.0, s[1:] - s[:-1]])
    keep = steps > tol * float(s[-1])
    kappa = torch.full_like(s, float('nan'))
    tau = torch.full_like(s, float('nan'))
    if int(keep.sum()) >= 4:
        d = local_derivatives(curve[keep], s[keep], window)
        kappa[keep], tau[keep] = frenet(d[0], d[1], d[2])
    return s, kappa, tau


def total_rotation(s, kappa, tau):
    """Cumulative rotation [N] of the Frenet frame along the curve, in radians: the trapezoidal
    integral of |omega| = sqrt(kappa^2 + tau^2) over arc length. Points without a value (NaN: left
    out of the fit) add nothing."""
    omega = torch.nan_to_num(torch.sqrt(kappa.square() + tau.square()), nan=0.0)
    pieces = 0.5 * (omega[1:] + omega[:-1]) * (s[1:] - s[:-1])
    return torch.cat([torch.zeros_like(s[:1]), pieces.cumsum(0)])


def trajectory_geometry(points, window=7):
    """Per trajectory of points [N, B, D]: its 3-D chord-frame coordinates, and kappa, tau, arc
    length and cumulative rotation [B, N] of that projected curve. Every quantity is computed from
    the trajectory alone (no batch reduction), so it does not depend on how trajectories are
    batched."""
    coords, shares = chord_coordinates(points, 3)
    rows = [curvature_torsion(coords[:, b], window) for b in range(points.shape[1])]
    s, kappa, tau = (torch.stack([r[i] for r in rows]) for i in range(3))
    rotation = torch.stack([total_rotation(*r) for r in rows])
    return dict(coords=coords, shares=shares, s=s, kappa=kappa, tau=tau, rotation=rotation)


# ----------------------------------------------------------------------------------------------
# Orthogonal Procrustes.

def procrustes(a, b):
    """The orthogonal matrix R [k, k] that minimises ||a R - b||_F for point sets a, b [N, k]
    (Schoenemann: R = U V^T from the SVD a^T b = U S V^T). Reflections are allowed: the signs of
    principal directions are arbitrary."""
    u, _, vh = torch.linalg.svd(a.T @ b)
    return u @ vh


def align_to_reference(coords, reference=0):
    """Every trajectory's coordinates [N, B, k] mapped by its Procrustes rotation onto trajectory
    `reference`'s. Returns (aligned [N, B, k], residual [B]: the RMS distance to the reference
    after alignment over the RMS distance before)."""
    ref = coords[:, reference]
    aligned, residual = [], []
    for b in range(coords.shape[1]):
        mapped = coords[:, b] @ procrustes(coords[:, b], ref)
        before = (coords[:, b] - ref).square().mean().sqrt()
        after = (mapped - ref).square().mean().sqrt()
        aligned.append(mapped)
        residual.append(float(after / before) if before > 0 else 0.0)
    return torch.stack(aligned, 1), residual
