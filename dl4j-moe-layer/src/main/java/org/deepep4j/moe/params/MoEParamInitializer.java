package org.deepep4j.moe.params;

import org.deepep4j.moe.conf.MoELayer;
import org.deeplearning4j.nn.api.ParamInitializer;
import org.deeplearning4j.nn.conf.NeuralNetConfiguration;
import org.deeplearning4j.nn.conf.layers.Layer;
import org.deeplearning4j.nn.weights.IWeightInit;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.indexing.NDArrayIndex;

import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * Parameters of a {@link MoELayer}, in flattened order:
 * router weights {@code Wr [nIn, E]}, router selection bias {@code br [1, E]} (moved by load statistics, never by a
 * gradient of the loss), then per local expert j {@code e<j>W1 [nIn, ffn]}, {@code e<j>W3 [nIn, ffn]},
 * {@code e<j>W2 [ffn, nIn]}, then the optional shared expert {@code sW1, sW3, sW2}. Keys have no '_' because DL4J
 * splits gradient keys "layer_param" at it.
 * Expert keys use the local index; on rank r local expert j is global expert {@code r * E/R + j}.
 */
public final class MoEParamInitializer implements ParamInitializer {

    public static final String ROUTER_WEIGHT = "Wr";
    public static final String ROUTER_BIAS = "br";
    public static final String SHARED_PREFIX = "s";
    private static final Pattern EXPERT_KEY = Pattern.compile("e(\\d+)(W[123])");

    private static final MoEParamInitializer INSTANCE = new MoEParamInitializer();

    public static MoEParamInitializer getInstance() {
        return INSTANCE;
    }

    public static String expertKey(int localExpert, String matrix) {
        return "e" + localExpert + matrix;
    }

    /** True for parameters that live on one rank only (routed experts); all others are replicated. */
    public static boolean isExpertParam(String key) {
        return EXPERT_KEY.matcher(key).matches();
    }

    /** Local expert index of an expert key, -1 for other keys. */
    public static int expertIndex(String key) {
        Matcher m = EXPERT_KEY.matcher(key);
        return m.matches() ? Integer.parseInt(m.group(1)) : -1;
    }

    /** Key of the same matrix under another local expert index. */
    public static String withExpertIndex(String key, int localExpert) {
        Matcher m = EXPERT_KEY.matcher(key);
        if (!m.matches()) {
            throw new IllegalArgumentException("param key=" + key + ": is not an expert key (e<j>W1|W2|W3)");
        }
        return expertKey(localExpert, m.group(2));
    }

    @Override
    public long numParams(NeuralNetConfiguration conf) {
        return numParams(conf.getLayer());
    }

    @Override
    public long numParams(Layer layer) {
        long n = 0;
        for (long[] s : shapes((MoELayer) layer).values()) {
            n += s[0] * s[1];
        }
        return n;
    }

    /** Every parameter's shape, in flattened order. */
    public static Map<String, long[]> shapes(MoELayer c) {
        long nIn = c.getNIn();
        long e = c.getNumExperts();
        Map<String, long[]> m = new LinkedHashMap<>();
        m.put(ROUTER_WEIGHT, new long[]{nIn, e});
        m.put(ROUTER_BIAS, new long[]{1, e});
        for (int j = 0; j < c.getNumLocalExperts(); j++) {
            m.put(expertKey(j, "W1"), new long[]{nIn, c.getFfnSize()});
            m.put(expertKey(j, "W3"), new long[]{nIn, c.getFfnSize()});
            m.put(expertKey(j, "W2"), new long[]{c.getFfnSize(), nIn});
        }
        if (c.getSharedExpertFfnSize() > 0) {
            m.put(SHARED_PREFIX + "W1", new long[]{nIn, c.getSharedExpertFfnSize()});
            m.put(SHARED_PREFIX + "W3", new long[]{nIn, c.getSharedExpertFfnSize()});
            m.put(SHARED_PREFIX + "W2", new long[]{c.getSharedExpertFfnSize(), nIn});
        }
        return m;
    }

    @Override
    public List<String> paramKeys(Layer layer) {
        return new ArrayList<>(shapes((MoELayer) layer).keySet());
    }

    @Override
    public List<String> weightKeys(Layer layer) {
        List<String> keys = paramKeys(layer);
        keys.remove(ROUTER_BIAS);
        return keys;
    }

    @Override
    public List<String> biasKeys(Layer layer) {
        return Collections.singletonList(ROUTER_BIAS);
    }

    @Override
    public boolean isWeightParam(Layer layer, String key) {
        return !ROUTER_BIAS.equals(key) && paramKeys(layer).contains(key);
    }

    @Override
    public boolean isBiasParam(Layer layer, String key) {
        return ROUTER_BIAS.equals(key);
    }

    @Override
    public Map<String, INDArray> init(NeuralNetConfiguration conf, INDArray paramsView, boolean initializeParams) {
        MoELayer c = (MoELayer) conf.getLayer();
        Map<String, INDArray> views = split(c, paramsView);
        if (initializeParams) {
            IWeightInit init = c.getWeightInitFn();
            for (Map.Entry<String, INDArray> v : views.entrySet()) {
                if (ROUTER_BIAS.equals(v.getKey())) {
                    v.getValue().assign(0.0);
                } else {
                    long[] s = v.getValue().shape();
                    init.init(s[0], s[1], s, 'f', v.getValue());
                }
            }
        }
        for (Map.Entry<String, INDArray> v : views.entrySet()) {
            conf.addVariable(v.getKey());
        }
        return views;
    }

    @Override
    public Map<String, INDArray> getGradientsFromFlattened(NeuralNetConfiguration conf, INDArray gradientView) {
        return split((MoELayer) conf.getLayer(), gradientView);
    }

    private static Map<String, INDArray> split(MoELayer c, INDArray flat) {
        Map<String, long[]> shapes = shapes(c);
        long total = 0;
        for (long[] s : shapes.values()) {
            total += s[0] * s[1];
        }
        if (flat.length() != total) {
            throw new IllegalStateException("MoELayer parameter view length=" + flat.length() + ": expected " + total);
        }
        INDArray row = flat.reshape(1, flat.length());
        Map<String, INDArray> out = new LinkedHashMap<>();
        long offset = 0;
        for (Map.Entry<String, long[]> e : shapes.entrySet()) {
            long n = e.getValue()[0] * e.getValue()[1];
            out.put(e.getKey(), row.get(NDArrayIndex.interval(0, 0, true), NDArrayIndex.interval(offset, offset + n))
                    .reshape('f', e.getValue()[0], e.getValue()[1]));
            offset += n;
        }
        return out;
    }
}
