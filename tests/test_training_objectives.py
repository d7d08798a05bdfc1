"""The ZINB loss on a gene subset per step (``zinb_genes``), neighbourhood denoising
(``query_noise``), the pull towards the nearest chunk mate (``w_neighbour``) and the target pooled
with the nearest chunk mates (``pool_mates``): the pieces on
small tensors, and whole fits on simulated counts."""

import numpy as np
import pytest
import torch

from schashformer import SCHashFormer
from schashformer.engine import loss_genes
from schashformer.metrics import clustering_scores
from schashformer.nn import NeighbourhoodEncoder, ZINBDecoder
from schashformer.nn.local_attention import nearest_keys, without_self
from schashformer.nn.losses import neighbour_pull, pool_chunk_mates, zinb_on
from schashformer.nn.zinb import zinb_nll
from schashformer.train import TrainConfig

from .conftest import FAST, simulate_counts


def test_decoder_on_a_gene_subset_gives_those_columns_of_the_full_decode():
    torch.manual_seed(0)
    dec = ZINBDecoder(6, 40, n_hidden=16)
    z, sf = torch.randn(5, 6), torch.rand(5) + 0.5
    genes = torch.tensor([1, 7, 8, 30])
    for full, part in zip(dec(z, sf), dec(z, sf, genes=genes)):
        assert part.shape == (5, 4)
        torch.testing.assert_close(part, full[:, genes])


def test_zinb_on_every_gene_equals_the_full_likelihood_and_a_subset_its_columns():
    torch.manual_seed(1)
    dec = ZINBDecoder(6, 30, n_hidden=16)
    z, sf = torch.randn(8, 6), torch.ones(8)
    counts = torch.poisson(torch.rand(8, 30) * 3)
    full = zinb_nll(counts, *dec(z, sf))
    torch.testing.assert_close(zinb_on(dec, z, counts, sf, None, torch.arange(30)), full)
    genes = torch.tensor([0, 4, 9])
    torch.testing.assert_close(zinb_on(dec, z, counts, sf, None, genes), zinb_nll(counts[:, genes], *dec(z, sf, None, genes)))
    assert zinb_on(dec, z, counts, sf, None, genes) != full


def test_loss_genes_draws_a_sorted_subset_without_repeats_or_none():
    rng = np.random.default_rng(0)
    genes = loss_genes(100, TrainConfig(zinb_genes=10), rng, torch.device("cpu"))
    values = genes.numpy()
    assert len(values) == 10 and len(set(values)) == 10 and (np.diff(values) > 0).all() and values.max() < 100
    assert not torch.equal(genes, loss_genes(100, TrainConfig(zinb_genes=10), rng, torch.device("cpu")))
    assert loss_genes(100, TrainConfig(zinb_genes=None), rng, torch.device("cpu")) is None
    assert loss_genes(100, TrainConfig(zinb_genes=100), rng, torch.device("cpu")) is None


def test_without_self_hides_each_query_from_itself_unless_it_is_alone():
    key_mask = torch.tensor([[True, True, True, True], [False, False, True, False]])
    mask = without_self(key_mask, n_query=2)  # queries at positions 2 and 3
    assert mask.shape == (2, 2, 4)
    assert mask[0].tolist() == [[True, True, False, True], [True, True, True, False]]
    # chunk 2: query 0 (position 2) has no other key: it keeps its own; query 1 is padding
    assert mask[1, 0].tolist() == [False, False, True, False]


def test_nearest_keys_keeps_the_k_most_similar_allowed_keys_per_query():
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [-1.0, 0.0], [0.7, 0.7], [1.0, 0.05]]])
    allowed = torch.tensor([[True, True, False, True, True, True]])  # key 2 (the nearest to query 0) is padding
    queries = keys[:, -2:]  # queries at positions 4 and 5
    mask = nearest_keys(keys, queries, allowed, k=2)
    assert mask.shape == (1, 2, 6)
    assert mask[0, 1].tolist() == [True, False, False, False, False, True]  # itself and key 0, not padding key 2
    assert mask[0, 0].tolist() == [False, False, False, False, True, True]  # itself and (1, .05): cos .74 > .71
    alone = nearest_keys(keys, queries, torch.zeros(1, 6, dtype=torch.bool), k=2)
    assert not alone.any()  # nothing allowed stays nothing (without_self keeps a lone query's own key)


def test_far_keys_do_not_reach_a_query_restricted_to_its_neighbours():
    torch.manual_seed(2)
    enc = NeighbourhoodEncoder(4, d_model=16, n_heads=2, n_latent=4, dropout=0.0, token_residual=True,
                               neighbours=2).eval()
    torch.nn.init.normal_(enc.to_latent[1].weight)
    x = torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0.9, 0.1, 0, 0], [1.0, 0.05, 0, 0]]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    moved = x.clone()
    moved[0, 1] *= 3.0  # key 1 is orthogonal to query 1 (position 3): not among its 2 nearest
    torch.testing.assert_close(enc(moved, mask, 2)[0, 1], enc(x, mask, 2)[0, 1])
    moved = x.clone()
    moved[0, 0] *= 3.0  # key 0 is: the query reads it
    assert not torch.allclose(enc(moved, mask, 2)[0, 1], enc(x, mask, 2)[0, 1])


def test_excluded_own_key_does_not_reach_the_query_but_reaches_its_neighbours():
    torch.manual_seed(0)
    enc = NeighbourhoodEncoder(8, d_model=16, n_heads=2, n_latent=8, dropout=0.0, token_residual=True,
                               exclude_self=True).eval()
    torch.nn.init.normal_(enc.to_latent[1].weight)  # a non-zero update, as after training
    x = torch.randn(1, 6, 8)
    mask = torch.ones(1, 6, dtype=torch.bool)
    queries = x[:, -3:].clone()
    moved = x.clone()
    moved[0, 3] += 5.0  # the key copy of query 0's token (position 3 = the first of the 3 queries)
    z, z_moved = enc(x, mask, 3, query_x=queries), enc(moved, mask, 3, query_x=queries)
    torch.testing.assert_close(z_moved[0, 0], z[0, 0])  # query 0 never reads its own key
    assert not torch.allclose(z_moved[0, 1:], z[0, 1:])  # its chunk mates do


@pytest.mark.parametrize("exclude_self", [False, True])
def test_consecutive_chunks_share_key_projections_with_the_same_result(exclude_self):
    torch.manual_seed(1)
    enc = NeighbourhoodEncoder(8, d_model=16, n_heads=2, n_latent=8, n_layers=2, dropout=0.0, token_residual=True,
                               exclude_self=exclude_self).eval()
    torch.nn.init.normal_(enc.to_latent[1].weight)
    c, order = 4, torch.randn(21, 8)  # 21 sorted cells: 6 chunks, the last one padded
    chunks = torch.cat([torch.arange(21), torch.full((3,), -1)]).view(6, c)
    rows = torch.cat([torch.full((1, c), -1), chunks])  # chunk 0 has no look-back
    ids = torch.cat([rows[:-1], rows[1:]], 1)  # (6, 2C): look-back then chunk, as buckets.with_lookback
    x, mask = order[ids.clamp(min=0)], ids >= 0
    z = enc(x, mask, c)
    torch.testing.assert_close(enc(x, mask, c, consecutive=True), z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc(x[2:], mask[2:], c, consecutive=True), z[2:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="2C"):
        enc(x[:, c // 2:], mask[:, c // 2:], c, consecutive=True)


def test_neighbour_pull_moves_each_query_towards_its_nearest_present_chunk_mate():
    # one chunk of 4 queries: tokens 0 and 1 are near each other, 2 is near 0's opposite, 3 is absent
    tokens = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [-1.0, 0.1], [0.95, 0.05]]])
    present = torch.tensor([[True, True, True, False]])
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, -0.8], [5.0, 5.0]]], requires_grad=True)
    loss = neighbour_pull(z, tokens, present)
    # mates: 0 -> 1 (cos 0), 1 -> 0 (cos 0), 2 -> 1 (nearest present other; cos -0.8): mean distance 3.8 / 3
    torch.testing.assert_close(loss, torch.tensor(3.8 / 3))
    loss.backward()
    assert z.grad[0, 3].abs().sum() == 0  # the absent cell neither pulls nor is pulled
    assert z.grad[0, 2].abs().sum() > 0
    # the mate's z is held fixed: cell 1, the mate of 0 and 2, gets the gradient of its own distance only
    z2 = z.detach().clone().requires_grad_(True)
    (1 - torch.cosine_similarity(z2[0, 1], z2[0, 0].detach(), dim=0)).div(3).backward()
    torch.testing.assert_close(z.grad[0, 1], z2.grad[0, 1])
    # identical mates cost nothing; a chunk with one present query has no pair and costs nothing
    same = torch.ones(1, 4, 2)
    assert neighbour_pull(same, tokens, torch.ones(1, 4, dtype=torch.bool)).abs() < 1e-6
    lone = neighbour_pull(z, tokens, torch.tensor([[False, True, False, False]]))
    assert lone == 0 and torch.isfinite(lone)


def test_pooled_target_adds_the_counts_of_the_nearest_present_chunk_mates():
    # two chunks of 3: in chunk 0, tokens 0 and 2 are close and 1 is far; in chunk 1 only slot 0 is present
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.2]], [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]])
    present = torch.tensor([[True, True, True], [True, False, False]])
    counts = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [5.0, 5.0]])  # rows in the order of present
    sizes = torch.tensor([1.0, 2.0, 3.0, 4.0])
    pooled, pooled_sizes = pool_chunk_mates(counts, sizes, tokens, present, 1)
    # 0 -> 2, 1 -> 2 (cos 0.2 against 0), 2 -> 0; the lone query keeps its own counts
    torch.testing.assert_close(pooled, torch.tensor([[4.0, 0.0], [3.0, 2.0], [4.0, 0.0], [5.0, 5.0]]))
    torch.testing.assert_close(pooled_sizes, torch.tensor([4.0, 5.0, 4.0, 4.0]))
    # every mate of a 3-query chunk: each query pools the whole chunk; 0 mates changes nothing
    every, every_sizes = pool_chunk_mates(counts, sizes, tokens, present, 5)
    torch.testing.assert_close(every[:3], counts[:3].sum(0).expand(3, 2))
    torch.testing.assert_close(every_sizes, torch.tensor([6.0, 6.0, 6.0, 4.0]))
    assert pool_chunk_mates(counts, sizes, tokens, present, 0)[0] is counts


def test_query_noise_zero_is_the_plain_fit():
    """query_noise 0 and zinb_genes None are today's fit exactly (the defaults add no random draws)."""
    adata = simulate_counts(n_cells=200, n_genes=100, seed=3)
    a = SCHashFormer(3, seed=0, progress=False, **FAST).fit(adata)
    b = SCHashFormer(3, seed=0, progress=False, query_noise=0.0, zinb_genes=None, **FAST).fit(adata)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    np.testing.assert_array_equal(a.embedding_, b.embedding_)


@pytest.mark.parametrize("params", [{"zinb_genes": 40}, {"query_noise": 1.0},
                                    {"query_noise": 1.0, "attention_neighbours": 4}, {"w_neighbour": 0.3}, {"pool_mates": 1}])
def test_fits_with_either_objective_cluster_simulated_types(params):
    adata = simulate_counts(n_cells=300, n_genes=150, seed=4)
    model = SCHashFormer(3, seed=0, progress=False, **{**FAST, **params}).fit(adata)
    assert all(np.isfinite(r["loss"]) for r in model.history_)
    assert clustering_scores(adata.obs["label"].to_numpy(), model.labels_)["ari"] > 0.8
    assert model.encoder_.exclude_self == (params.get("query_noise", 0) > 0)
    assert model.encoder_.neighbours == params.get("attention_neighbours", 0)


def test_bad_values_are_named():
    from schashformer.errors import ParameterError

    with pytest.raises(ParameterError, match="zinb_genes"):
        SCHashFormer(3, zinb_genes=0).check_params()
    with pytest.raises(ParameterError, match="query_noise"):
        SCHashFormer(3, query_noise=-1.0).check_params()
    with pytest.raises(ParameterError, match="attention_neighbours"):
        SCHashFormer(3, attention_neighbours=-2).check_params()
    with pytest.raises(ParameterError, match="w_neighbour"):
        SCHashFormer(3, w_neighbour=-0.1).check_params()
    with pytest.raises(ParameterError, match="pool_mates"):
        SCHashFormer(3, pool_mates=-1).check_params()


def test_target_balance_scales_the_size_correction_of_the_dec_target():
    from schashformer.nn import target_distribution

    q = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.2, 0.8]])
    dec = target_distribution(q)
    torch.testing.assert_close(target_distribution(q, balance=1.0), dec)
    sharpened = q.pow(2) / q.pow(2).sum(1, keepdim=True)
    torch.testing.assert_close(target_distribution(q, balance=0.0), sharpened)
    # DEC's division by the cluster size moves mass from the large cluster 0 to the small cluster 1
    assert (dec[:, 1] > sharpened[:, 1]).all()
