/* The MoE's discrete routing steps on the CPU (sourcelm/model/native.py builds and loads it; the torch
   code they stand for: `moe.Router.forward`'s selection and `grouped_experts.group_by_expert`).

   route_topk: for each token, with s' = scores + bias (fp32, [tokens, E]) and E experts in G groups:
     group score = sum of the group's top `per_group` values of s' (added largest first);
     the `keep_groups` best groups stay, the others are out; then the top `k` experts of s' among the
     kept groups, best first. Ties go to the lower index; NaN never wins. This is the selection of
     DeepSeek-V3's router (report §2.1.2), which torch does with three topk calls, a scatter and a
     masked fill, ~1 ms a layer on the tiny preset.
   count_experts / lay_out_slots: a stable counting sort of the slots (token, k) by expert id into rows
     grouped by expert, each group starting at the prefix sum of `padded` (its padded size); ids < 0 are
     slots computed elsewhere. torch does it with an argsort, a bincount and three scatters.
   The routing of one token is computed by one thread; the counting sort is sequential (its cost is a
   few microseconds), so every result is independent of the thread count. */

#include <math.h>

#include "common.h"

#define MAX_EXPERTS 4096

/* index of the largest value among the allowed and not yet taken, lower index on ties; -1 if none */
static int64_t best_of(const float *v, const unsigned char *ok, int64_t n) {
    int64_t best = -1;
    for (int64_t i = 0; i < n; i++) {
        if (!ok[i])
            continue;
        if (best < 0 || v[i] > v[best] || (isnan(v[best]) && !isnan(v[i])))
            best = i;
    }
    return best;
}

static void route_token(const float *restrict scores, const float *restrict bias, int64_t e, int64_t groups,
                        int64_t per_group, int64_t keep_groups, int64_t k, int64_t *restrict out) {
    float biased[MAX_EXPERTS], group_score[MAX_EXPERTS];
    unsigned char ok[MAX_EXPERTS];
    const int64_t size = e / groups;
    for (int64_t i = 0; i < e; i++)
        biased[i] = scores[i] + bias[i];
    for (int64_t i = 0; i < e; i++)
        ok[i] = 1;
    if (groups > 1) {
        for (int64_t g = 0; g < groups; g++) {  /* the group's top `per_group`, added largest first */
            float sum = 0.0f;
            for (int64_t j = 0; j < per_group; j++) {
                const int64_t b = best_of(biased + g * size, ok + g * size, size);
                if (b < 0)
                    break;
                sum += biased[g * size + b];
                ok[g * size + b] = 0;
            }
            for (int64_t j = 0; j < size; j++)
                ok[g * size + j] = 1;
            group_score[g] = sum;
        }
        unsigned char group_ok[MAX_EXPERTS], kept[MAX_EXPERTS];
        for (int64_t g = 0; g < groups; g++)
            group_ok[g] = 1, kept[g] = 0;
        for (int64_t j = 0; j < keep_groups; j++) {
            const int64_t g = best_of(group_score, group_ok, groups);
            if (g < 0)
                break;
            group_ok[g] = 0;
            kept[g] = 1;
        }
        for (int64_t i = 0; i < e; i++)
            ok[i] = kept[i / size];
    }
    for (int64_t j = 0; j < k; j++) {
        const int64_t b = best_of(biased, ok, e);
        out[j] = b;  /* -1 only if fewer than k experts are allowed, which native.route_takes excludes */
        if (b >= 0)
            ok[b] = 0;
    }
}

void route_topk(const float *scores, const float *bias, int64_t tokens, int64_t e, int64_t groups,
                int64_t per_group, int64_t keep_groups, int64_t k, int64_t *out) {
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tokens; t++)
        route_token(scores + t * e, bias, e, groups, per_group, keep_groups, k, out + t * k);
}

/* counts[e] = slots with id e; returns the number of ids >= n_experts (a caller's bug) */
int64_t count_experts(const int64_t *ids, int64_t slots, int64_t n_experts, int64_t *counts) {
    int64_t bad = 0;
    for (int64_t e = 0; e < n_experts; e++)
        counts[e] = 0;
    for (int64_t s = 0; s < slots; s++) {
        if (ids[s] >= n_experts)
            bad++;
        else if (ids[s] >= 0)
            counts[ids[s]]++;
    }
    return bad;
}

/* row_of_slot[s] = the row of slot s (rows: total rows; absent slots get `rows`, the sentinel);
   copy_of_row[r] = the slot row r holds (`slots` for padding rows). `scratch` holds 2 * n_experts values.
   Returns the number of slots whose id is >= n_experts or whose group is full (padded[e] below its
   count): a caller's bug, reported without writing past a group. */
int64_t lay_out_slots(const int64_t *ids, int64_t slots, int64_t n_experts, const int64_t *padded, int64_t rows,
                      int64_t *scratch, int64_t *copy_of_row, int64_t *row_of_slot) {
    int64_t *next = scratch, *end = scratch + n_experts, start = 0, bad = 0;
    for (int64_t e = 0; e < n_experts; e++) {
        next[e] = start;
        start += padded[e];
        end[e] = start < rows ? start : rows;
    }
    for (int64_t r = 0; r < rows; r++)
        copy_of_row[r] = slots;
    for (int64_t s = 0; s < slots; s++) {
        const int64_t e = ids[s];
        row_of_slot[s] = rows;
        if (e < 0)
            continue;
        if (e >= n_experts || next[e] >= end[e]) {
            bad++;
            continue;
        }
        const int64_t r = next[e]++;
        row_of_slot[s] = r;
        copy_of_row[r] = s;
    }
    return bad;
}
